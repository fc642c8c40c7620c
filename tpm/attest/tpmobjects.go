package attest

// TPM objects the station receives as bytes (go-tpm's tpm2 structures): public areas (TPMT_PUBLIC), the station's
// half of credential activation, and the check of a TPM2_Certify. Every parse is strict: a structure must re-encode
// to exactly the bytes given, so nothing can hide behind it.

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/subtle"
	"encoding/asn1"
	"encoding/binary"
	"errors"
	"fmt"
	"math/big"

	"github.com/google/go-tpm/tpm2"
)

// decodeStrict unmarshals a TPM structure from exactly b (no trailing bytes, re-encoding gives b back). go-tpm's
// reflection can panic on contents it does not expect; that is a malformed structure too.
func decodeStrict[T tpm2.Marshallable, P interface {
	*T
	tpm2.Unmarshallable
}](b []byte) (v *T, err error) {
	if len(b) == 0 {
		return nil, errors.New("empty")
	}
	defer func() {
		if r := recover(); r != nil {
			v, err = nil, fmt.Errorf("malformed (%v)", r)
		}
	}()
	v, err = tpm2.Unmarshal[T, P](b)
	if err != nil {
		return nil, fmt.Errorf("malformed: %w", err)
	}
	if !bytes.Equal(tpm2.Marshal(*v), b) {
		return nil, errors.New("malformed: trailing or non-canonical bytes")
	}
	return v, nil
}

// decodePublic unmarshals a TPMT_PUBLIC.
func decodePublic(what string, public []byte) (*tpm2.TPMTPublic, error) {
	p, err := decodeStrict[tpm2.TPMTPublic](public)
	if err != nil {
		return nil, fmt.Errorf("attest: %s public area: %w", what, err)
	}
	return p, nil
}

// publicKeyOf is the key of a public area; an ECC point must lie on its curve.
func publicKeyOf(what string, p *tpm2.TPMTPublic) (crypto.PublicKey, error) {
	pub, err := tpm2.Pub(*p)
	if err != nil {
		return nil, fmt.Errorf("attest: %s public key: %w", what, err)
	}
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if _, err := k.ECDH(); err != nil {
			return nil, fmt.Errorf("attest: %s public key: the point is not on its curve", what)
		}
	case *rsa.PublicKey:
		if k.N.Sign() <= 0 || k.N.BitLen() < 1024 {
			return nil, fmt.Errorf("attest: %s public key: RSA modulus of %d bits", what, k.N.BitLen())
		}
	}
	return pub, nil
}

// MakeCredential is the station's half of credential activation: it seals secret to the TPM holding the EK (ekPublic,
// a marshalled TPMT_PUBLIC) for the key named akName. Only that TPM, holding that key, can recover it.
func MakeCredential(ekPublic, akName, secret []byte) (credentialBlob, encryptedSecret []byte, err error) {
	ek, err := decodePublic("EK", ekPublic)
	if err != nil {
		return nil, nil, err
	}
	if a := ek.ObjectAttributes; !a.Restricted || !a.Decrypt || a.SignEncrypt {
		return nil, nil, errors.New("attest: the EK is not a restricted decryption key")
	}
	if _, err := publicKeyOf("EK", ek); err != nil {
		return nil, nil, err
	}
	if err := checkName(akName); err != nil {
		return nil, nil, fmt.Errorf("attest: AK name: %w", err)
	}
	h, err := ek.NameAlg.Hash()
	if err != nil {
		return nil, nil, fmt.Errorf("attest: EK name algorithm: %w", err)
	}
	if len(secret) == 0 || len(secret) > h.Size() {
		return nil, nil, fmt.Errorf("attest: credential of %d bytes (1 to %d for this EK)", len(secret), h.Size())
	}
	key, err := tpm2.ImportEncapsulationKey(ek)
	if err != nil {
		return nil, nil, fmt.Errorf("attest: EK: %w", err)
	}
	credentialBlob, encryptedSecret, err = tpm2.CreateCredential(rand.Reader, key, akName, secret)
	if err != nil {
		return nil, nil, fmt.Errorf("attest: make credential: %w", err)
	}
	return credentialBlob, encryptedSecret, nil
}

// checkName checks the form of an object Name: a 2-byte hash algorithm then a digest of that algorithm's size.
func checkName(name []byte) error {
	if len(name) < 2 {
		return errors.New("too short")
	}
	h, err := tpm2.TPMIAlgHash(binary.BigEndian.Uint16(name)).Hash()
	if err != nil {
		return err
	}
	if len(name)-2 != h.Size() {
		return fmt.Errorf("digest of %d bytes for a %v name", len(name)-2, h)
	}
	return nil
}

// Name computes a TPM object's Name from its marshalled TPMT_PUBLIC.
func Name(public []byte) ([]byte, error) {
	p, err := decodePublic("object", public)
	if err != nil {
		return nil, err
	}
	n, err := tpm2.ObjectName(p)
	if err != nil {
		return nil, fmt.Errorf("attest: object name: %w", err)
	}
	return n.Buffer, nil
}

// PublicKey decodes the public key of a marshalled TPMT_PUBLIC.
func PublicKey(public []byte) (crypto.PublicKey, error) {
	p, err := decodePublic("object", public)
	if err != nil {
		return nil, err
	}
	return publicKeyOf("object", p)
}

// badEvidence is an ErrBadEvidence saying which check failed.
func badEvidence(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrBadEvidence, fmt.Sprintf(format, args...))
}

// CheckAK checks an attestation key's public area: a restricted signing key that cannot leave its TPM.
func CheckAK(akPublic []byte) error {
	_, _, err := checkAK(akPublic)
	return err
}

func checkAK(akPublic []byte) (*tpm2.TPMTPublic, crypto.PublicKey, error) {
	p, err := decodeStrict[tpm2.TPMTPublic](akPublic)
	if err != nil {
		return nil, nil, badEvidence("AK public area: %v", err)
	}
	a := p.ObjectAttributes
	switch {
	case !a.SignEncrypt:
		return nil, nil, badEvidence("the AK is not a signing key")
	case !a.Restricted:
		return nil, nil, badEvidence("the AK is not restricted (it could sign data that only looks like an attestation)")
	case a.Decrypt:
		return nil, nil, badEvidence("the AK is also a decryption key")
	case !a.FixedTPM:
		return nil, nil, badEvidence("the AK is not fixedTPM (it could have been duplicated out of its TPM)")
	case !a.FixedParent:
		return nil, nil, badEvidence("the AK is not fixedParent")
	case !a.SensitiveDataOrigin:
		return nil, nil, badEvidence("the AK's private key was not generated inside the TPM (no sensitiveDataOrigin)")
	}
	pub, err := publicKeyOf("AK", p)
	if err != nil {
		return nil, nil, badEvidence("%v", err)
	}
	return p, pub, nil
}

// VerifyCertify checks a TPM2_Certify of a key: attest is a TPMS_ATTEST with the TPM magic, type ATTEST_CERTIFY,
// extraData equal to nonce and the certified Name equal to the Name of keyPublic; signature (a marshalled
// TPMT_SIGNATURE) verifies with the AK; keyPublic has fixedTPM, fixedParent and sensitiveDataOrigin. Errors wrap
// ErrBadEvidence and say which check failed. The AK must pass CheckAK (only a restricted key's signature proves the
// TPM made the attestation).
func VerifyCertify(akPublic, attest, signature, nonce, keyPublic []byte) error {
	akArea, akKey, err := checkAK(akPublic)
	if err != nil {
		return err
	}
	if len(attest) < 6 {
		return badEvidence("the certify attestation is truncated (%d bytes)", len(attest))
	}
	if tpm2.TPMGenerated(binary.BigEndian.Uint32(attest)) != tpm2.TPMGeneratedValue {
		return badEvidence("the certify attestation lacks the TPM_GENERATED magic (it was not made by a TPM)")
	}
	if tpm2.TPMST(binary.BigEndian.Uint16(attest[4:])) != tpm2.TPMSTAttestCertify {
		return badEvidence("the attestation is of type %#04x, not a TPM2_Certify", binary.BigEndian.Uint16(attest[4:]))
	}
	info, err := decodeStrict[tpm2.TPMSAttest](attest)
	if err != nil {
		return badEvidence("certify attestation: %v", err)
	}
	if err := verifySignature(akArea, akKey, attest, signature); err != nil {
		return err
	}
	if len(nonce) == 0 {
		return badEvidence("no nonce to check the attestation's freshness against")
	}
	if subtle.ConstantTimeCompare(info.ExtraData.Buffer, nonce) != 1 {
		return badEvidence("the attestation's nonce is not the station's (a replayed or foreign attestation)")
	}
	certified, err := info.Attested.Certify()
	if err != nil {
		return badEvidence("certify attestation: %v", err)
	}
	keyArea, err := decodeStrict[tpm2.TPMTPublic](keyPublic)
	if err != nil {
		return badEvidence("device key public area: %v", err)
	}
	keyName, err := tpm2.ObjectName(keyArea)
	if err != nil {
		return badEvidence("device key name: %v", err)
	}
	if !bytes.Equal(certified.Name.Buffer, keyName.Buffer) {
		return badEvidence("the attestation certifies another key (its Name is not the device key's)")
	}
	switch a := keyArea.ObjectAttributes; {
	case !a.FixedTPM:
		return badEvidence("the device key is not fixedTPM (it could have been duplicated out of the TPM)")
	case !a.FixedParent:
		return badEvidence("the device key is not fixedParent (it could be moved to another parent)")
	case !a.SensitiveDataOrigin:
		return badEvidence("the device key's private key was not generated inside the TPM (imported: no sensitiveDataOrigin)")
	}
	return nil
}

// verifySignature checks a TPMT_SIGNATURE by the AK over data: ECDSA for an ECC AK, RSASSA or RSAPSS for an RSA AK,
// with SHA-256, -384 or -512, and the AK's own scheme when its public area fixes one.
func verifySignature(ak *tpm2.TPMTPublic, key crypto.PublicKey, data, signature []byte) error {
	sig, err := decodeStrict[tpm2.TPMTSignature](signature)
	if err != nil {
		return badEvidence("AK signature: %v", err)
	}
	if scheme, hashAlg, ok := fixedScheme(ak); ok {
		if sig.SigAlg != scheme {
			return badEvidence("the AK signature's scheme %s is not the AK's %s", algName(sig.SigAlg), algName(scheme))
		}
		if h := signatureHash(sig); h != hashAlg {
			return badEvidence("the AK signature's hash %s is not the AK's %s", algName(h), algName(hashAlg))
		}
	}
	h, err := acceptedHash(signatureHash(sig))
	if err != nil {
		return err
	}
	d := h.New()
	d.Write(data)
	digest := d.Sum(nil)
	switch k := key.(type) {
	case *ecdsa.PublicKey:
		if sig.SigAlg != tpm2.TPMAlgECDSA {
			return badEvidence("the AK is an ECC key but its signature is %s, not ECDSA", algName(sig.SigAlg))
		}
		es, err := sig.Signature.ECDSA()
		if err != nil {
			return badEvidence("AK signature: %v", err)
		}
		r, s := new(big.Int).SetBytes(es.SignatureR.Buffer), new(big.Int).SetBytes(es.SignatureS.Buffer)
		if !ecdsa.Verify(k, digest, r, s) {
			return badEvidence("the AK's signature over the certify attestation does not verify")
		}
	case *rsa.PublicKey:
		var rs *tpm2.TPMSSignatureRSA
		var verr error
		switch sig.SigAlg {
		case tpm2.TPMAlgRSASSA:
			if rs, err = sig.Signature.RSASSA(); err == nil {
				verr = rsa.VerifyPKCS1v15(k, h, digest, rs.Sig.Buffer)
			}
		case tpm2.TPMAlgRSAPSS:
			if rs, err = sig.Signature.RSAPSS(); err == nil {
				verr = rsa.VerifyPSS(k, h, digest, rs.Sig.Buffer, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthAuto})
			}
		default:
			return badEvidence("the AK is an RSA key but its signature is %s, not RSASSA or RSAPSS", algName(sig.SigAlg))
		}
		if err != nil {
			return badEvidence("AK signature: %v", err)
		}
		if verr != nil {
			return badEvidence("the AK's signature over the certify attestation does not verify")
		}
	default:
		return badEvidence("AK key of type %T", key)
	}
	return nil
}

// SignatureForOpenSSL is a TPMT_SIGNATURE as other tools verify it: an ECDSA signature as the DER SEQUENCE of r and
// s, an RSASSA or RSAPSS signature as its bytes (`openssl dgst -sha256 -verify ak.pem -signature FILE attest.bin`,
// with `-sigopt rsa_padding_mode:pss` for RSAPSS). For exports of stored evidence.
func SignatureForOpenSSL(signature []byte) ([]byte, error) {
	sig, err := decodeStrict[tpm2.TPMTSignature](signature)
	if err != nil {
		return nil, fmt.Errorf("attest: signature: %w", err)
	}
	switch sig.SigAlg {
	case tpm2.TPMAlgECDSA:
		es, err := sig.Signature.ECDSA()
		if err != nil {
			return nil, fmt.Errorf("attest: signature: %w", err)
		}
		r, s := new(big.Int).SetBytes(es.SignatureR.Buffer), new(big.Int).SetBytes(es.SignatureS.Buffer)
		return asn1.Marshal(struct{ R, S *big.Int }{r, s})
	case tpm2.TPMAlgRSASSA:
		rs, err := sig.Signature.RSASSA()
		if err != nil {
			return nil, fmt.Errorf("attest: signature: %w", err)
		}
		return rs.Sig.Buffer, nil
	case tpm2.TPMAlgRSAPSS:
		rs, err := sig.Signature.RSAPSS()
		if err != nil {
			return nil, fmt.Errorf("attest: signature: %w", err)
		}
		return rs.Sig.Buffer, nil
	}
	return nil, fmt.Errorf("attest: signature scheme %s", algName(sig.SigAlg))
}

// signatureHash is the hash algorithm a signature names (TPM_ALG_NULL when it names none).
func signatureHash(sig *tpm2.TPMTSignature) tpm2.TPMIAlgHash {
	switch sig.SigAlg {
	case tpm2.TPMAlgECDSA:
		if s, err := sig.Signature.ECDSA(); err == nil {
			return s.Hash
		}
	case tpm2.TPMAlgRSASSA:
		if s, err := sig.Signature.RSASSA(); err == nil {
			return s.Hash
		}
	case tpm2.TPMAlgRSAPSS:
		if s, err := sig.Signature.RSAPSS(); err == nil {
			return s.Hash
		}
	}
	return tpm2.TPMAlgNull
}

// acceptedHash is the digest of a signature: SHA-1 is not accepted.
func acceptedHash(alg tpm2.TPMIAlgHash) (crypto.Hash, error) {
	switch alg {
	case tpm2.TPMAlgSHA256:
		return crypto.SHA256, nil
	case tpm2.TPMAlgSHA384:
		return crypto.SHA384, nil
	case tpm2.TPMAlgSHA512:
		return crypto.SHA512, nil
	}
	return 0, badEvidence("the AK signature uses hash %s (SHA-256, -384 or -512 needed)", algName(alg))
}

// fixedScheme is the signing scheme and hash an AK's public area fixes, if any.
func fixedScheme(ak *tpm2.TPMTPublic) (tpm2.TPMAlgID, tpm2.TPMIAlgHash, bool) {
	var scheme tpm2.TPMAlgID
	var details *tpm2.TPMUAsymScheme
	switch ak.Type {
	case tpm2.TPMAlgECC:
		p, err := ak.Parameters.ECCDetail()
		if err != nil {
			return 0, 0, false
		}
		scheme, details = p.Scheme.Scheme, &p.Scheme.Details
	case tpm2.TPMAlgRSA:
		p, err := ak.Parameters.RSADetail()
		if err != nil {
			return 0, 0, false
		}
		scheme, details = p.Scheme.Scheme, &p.Scheme.Details
	default:
		return 0, 0, false
	}
	switch scheme {
	case tpm2.TPMAlgECDSA:
		if d, err := details.ECDSA(); err == nil {
			return scheme, d.HashAlg, true
		}
	case tpm2.TPMAlgRSASSA:
		if d, err := details.RSASSA(); err == nil {
			return scheme, d.HashAlg, true
		}
	case tpm2.TPMAlgRSAPSS:
		if d, err := details.RSAPSS(); err == nil {
			return scheme, d.HashAlg, true
		}
	}
	return 0, 0, false
}

// algName names a TPM algorithm in messages.
func algName(a tpm2.TPMAlgID) string {
	switch a {
	case tpm2.TPMAlgNull:
		return "none"
	case tpm2.TPMAlgSHA1:
		return "SHA-1"
	case tpm2.TPMAlgSHA256:
		return "SHA-256"
	case tpm2.TPMAlgSHA384:
		return "SHA-384"
	case tpm2.TPMAlgSHA512:
		return "SHA-512"
	case tpm2.TPMAlgECDSA:
		return "ECDSA"
	case tpm2.TPMAlgRSASSA:
		return "RSASSA"
	case tpm2.TPMAlgRSAPSS:
		return "RSAPSS"
	case tpm2.TPMAlgHMAC:
		return "HMAC"
	}
	return fmt.Sprintf("algorithm %#04x", uint16(a))
}
