package tpm

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"sync"

	keyfile "github.com/foxboron/go-tpm-keyfiles"
	"github.com/google/go-tpm/tpm2"

	"provision/internal/pemkey"
)

// Key is a device key: TPM-resident (its handle loaded until Close) or, for the software fallback, in memory.
// It implements crypto.Signer.
type Key struct {
	dev  *Device
	alg  Algorithm
	pub  crypto.PublicKey
	soft crypto.Signer // software key only

	mu      sync.Mutex
	handle  tpm2.TPMHandle
	name    tpm2.TPM2BName
	loaded  bool
	public  tpm2.TPM2BPublic
	private tpm2.TPM2BPrivate
}

// deviceKeyTemplate: a signing key that never leaves the TPM (fixedTPM, fixedParent, sensitiveDataOrigin), usable with
// an empty password (userWithAuth), no decryption. The scheme is left open (NULL) so one key serves ECDSA, or RSASSA and
// RSA-PSS, with the hash the caller needs.
func deviceKeyTemplate(alg Algorithm) tpm2.TPMTPublic {
	attrs := tpm2.TPMAObject{FixedTPM: true, FixedParent: true, SensitiveDataOrigin: true, UserWithAuth: true, SignEncrypt: true}
	if alg == RSA2048 {
		return tpm2.TPMTPublic{
			Type: tpm2.TPMAlgRSA, NameAlg: tpm2.TPMAlgSHA256, ObjectAttributes: attrs,
			Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgRSA, &tpm2.TPMSRSAParms{
				Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
				Scheme:    tpm2.TPMTRSAScheme{Scheme: tpm2.TPMAlgNull},
				KeyBits:   2048,
			}),
			Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: make([]byte, 256)}),
		}
	}
	return tpm2.TPMTPublic{
		Type: tpm2.TPMAlgECC, NameAlg: tpm2.TPMAlgSHA256, ObjectAttributes: attrs,
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
			Scheme:    tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgNull},
			CurveID:   tpm2.TPMECCNistP256,
			KDF:       tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
			X: tpm2.TPM2BECCParameter{Buffer: make([]byte, 32)},
			Y: tpm2.TPM2BECCParameter{Buffer: make([]byte, 32)},
		}),
	}
}

// CreateKey makes a new device key: in the TPM under the storage root key, or in memory for the software fallback.
func (d *Device) CreateKey(ctx context.Context, alg Algorithm) (*Key, error) {
	if _, err := ParseAlgorithm(string(alg)); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if d.l == nil {
		var s crypto.Signer
		var err error
		if alg == RSA2048 {
			s, err = rsa.GenerateKey(rand.Reader, 2048)
		} else {
			s, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		}
		if err != nil {
			return nil, fmt.Errorf("tpm: software key: %w", err)
		}
		return &Key{dev: d, alg: alg, pub: s.Public(), soft: s}, nil
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil, fmt.Errorf("tpm: create device key: %w: device closed", ErrUnreachable)
	}
	if err := d.ensureSRK(ctx); err != nil {
		return nil, err
	}
	crsp, err := tpm2.Create{ParentHandle: d.parent(), InPublic: tpm2.New2B(deviceKeyTemplate(alg))}.Execute(d.l.with(ctx))
	if err != nil {
		return nil, d.sessionErr("create device key", d.auth(), err)
	}
	k := &Key{dev: d, alg: alg, public: crsp.OutPublic, private: crsp.OutPrivate}
	if err := k.load(ctx); err != nil {
		return nil, err
	}
	return k, nil
}

// load loads the key's blobs under the SRK. Callers hold d.mu.
func (k *Key) load(ctx context.Context) error {
	lrsp, err := tpm2.Load{ParentHandle: k.dev.parent(), InPrivate: k.private, InPublic: k.public}.Execute(k.dev.l.with(ctx))
	if err != nil {
		return k.dev.sessionErr("load device key", k.dev.auth(), err)
	}
	k.handle, k.name, k.loaded = lrsp.ObjectHandle, lrsp.Name, true
	pub, err := k.public.Contents()
	if err == nil {
		k.pub, err = tpm2.Pub(*pub)
	}
	if err != nil {
		tpm2.FlushContext{FlushHandle: k.handle}.Execute(k.dev.l.with(context.WithoutCancel(ctx))) // free it even when interrupted
		k.loaded = false
		return fmt.Errorf("tpm: device key public area: %w", err)
	}
	return nil
}

// LoadKeyFile loads a TSS2 PRIVATE KEY file (parent: the owner's standard ECC SRK) on the TPM that made it.
func LoadKeyFile(ctx context.Context, d *Device, pemBytes []byte) (*Key, error) {
	if d.l == nil {
		return nil, errors.New("tpm: a TSS2 key file needs a TPM, not soft")
	}
	tk, err := keyfile.Decode(pemBytes)
	if err != nil {
		return nil, fmt.Errorf("tpm: key file: %w", err)
	}
	if tk.Parent != tpm2.TPMRHOwner && tk.Parent != 0x81000001 {
		return nil, fmt.Errorf("tpm: key file: parent %#x is not the owner storage root key", uint32(tk.Parent))
	}
	pub, err := tk.Pubkey.Contents()
	if err != nil {
		return nil, fmt.Errorf("tpm: key file: %w", err)
	}
	alg := ECCP256
	if pub.Type == tpm2.TPMAlgRSA {
		alg = RSA2048
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil, fmt.Errorf("tpm: load key file: %w: device closed", ErrUnreachable)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := d.ensureSRK(ctx); err != nil {
		return nil, err
	}
	k := &Key{dev: d, alg: alg, public: tk.Pubkey, private: tk.Privkey}
	if err := k.load(ctx); err != nil {
		return nil, err
	}
	return k, nil
}

// Public is the key's public half.
func (k *Key) Public() crypto.PublicKey { return k.pub }

// Kind is KindTPM or KindSoft.
func (k *Key) Kind() string {
	if k.soft != nil {
		return KindSoft
	}
	return KindTPM
}

// Algorithm is the key's algorithm.
func (k *Key) Algorithm() Algorithm { return k.alg }

// FileName is the bundle file name of the key: device.tss2.pem for TPM keys, device.key for software keys.
func (k *Key) FileName() string {
	if k.soft != nil {
		return "device.key"
	}
	return "device.tss2.pem"
}

// PEM exports the key: a TSS2 PRIVATE KEY (the TPM-wrapped blob, which loads only on this TPM) or, for a software key,
// an unencrypted PKCS#8 PRIVATE KEY: the only copy, for the caller to write where the user asked.
func (k *Key) PEM() ([]byte, error) {
	if k.soft != nil {
		der, err := x509.MarshalPKCS8PrivateKey(k.soft)
		if err != nil {
			return nil, fmt.Errorf("tpm: software key: %w", err)
		}
		defer clear(der)
		return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
	}
	return keyFilePEM(k.public, k.private)
}

// Attributes reads the key's public area back from the TPM: keys that cannot leave it have fixedTPM, fixedParent and
// sensitiveDataOrigin set. A software key has none.
func (k *Key) Attributes() (fixedTPM, fixedParent, sensitiveDataOrigin bool, err error) {
	if k.soft != nil {
		return false, false, false, nil
	}
	k.dev.mu.Lock()
	defer k.dev.mu.Unlock()
	k.mu.Lock()
	defer k.mu.Unlock()
	if !k.loaded {
		return false, false, false, errors.New("tpm: key closed")
	}
	rsp, err := tpm2.ReadPublic{ObjectHandle: k.handle}.Execute(k.dev.l.with(context.Background()))
	if err != nil {
		return false, false, false, mapErr("read public area", err)
	}
	pub, err := rsp.OutPublic.Contents()
	if err != nil {
		return false, false, false, err
	}
	a := pub.ObjectAttributes
	return a.FixedTPM, a.FixedParent, a.SensitiveDataOrigin, nil
}

// Handle is the key's transient handle while loaded (0 for software keys), for tests.
func (k *Key) Handle() uint32 { return uint32(k.handle) }

// Close flushes the key's handle from the TPM; for a software key it drops the private key. It is idempotent.
func (k *Key) Close() error {
	if k.soft != nil {
		k.soft = nil
		return nil
	}
	k.dev.mu.Lock()
	defer k.dev.mu.Unlock()
	k.mu.Lock()
	defer k.mu.Unlock()
	if !k.loaded {
		return nil
	}
	k.loaded = false
	if k.dev.closed || k.dev.l.broken != nil {
		return nil // the TPM drops it with the connection (or the resource manager does); a stale flush at the next Open otherwise
	}
	if _, err := (tpm2.FlushContext{FlushHandle: k.handle}).Execute(k.dev.l.with(context.Background())); err != nil {
		return mapErr("flush device key", err)
	}
	return nil
}

// Sign signs digest: ECDSA (ASN.1 r,s) for ECC keys; RSASSA-PKCS1-v1_5, or RSA-PSS with the salt as long as the hash when
// opts is *rsa.PSSOptions (what TLS 1.3 uses). Every TPM signature is checked against the public key before it is
// returned.
func (k *Key) Sign(r io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	return k.SignContext(context.Background(), r, digest, opts)
}

// WithContext is the key as a crypto.Signer whose TPM commands are also cancelled with ctx (crypto.Signer has no
// context): hand it to x509.CreateCertificateRequest or a TLS client so an interrupt stops a signature in flight.
func (k *Key) WithContext(ctx context.Context) crypto.Signer { return ctxSigner{k, ctx} }

type ctxSigner struct {
	k   *Key
	ctx context.Context
}

func (s ctxSigner) Public() crypto.PublicKey { return s.k.Public() }

func (s ctxSigner) Sign(r io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	return s.k.SignContext(s.ctx, r, digest, opts)
}

// SignContext is Sign with the TPM command bounded by ctx as well as the command timeout.
func (k *Key) SignContext(ctx context.Context, r io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	if k.soft != nil {
		return k.soft.Sign(r, digest, opts)
	}
	h := opts.HashFunc()
	hashAlg, err := hashAlgID(h)
	if err != nil {
		return nil, err
	}
	if len(digest) != h.Size() {
		return nil, fmt.Errorf("tpm: sign: digest is %d bytes, %s wants %d", len(digest), h, h.Size())
	}
	var scheme tpm2.TPMTSigScheme
	pss, isPSS := opts.(*rsa.PSSOptions)
	switch k.alg {
	case ECCP256:
		scheme = tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgECDSA,
			Details: tpm2.NewTPMUSigScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSchemeHash{HashAlg: hashAlg})}
	case RSA2048:
		if isPSS {
			if pss.SaltLength != rsa.PSSSaltLengthEqualsHash && pss.SaltLength != rsa.PSSSaltLengthAuto && pss.SaltLength != h.Size() {
				return nil, fmt.Errorf("tpm: sign: RSA-PSS salt length %d: the TPM uses the hash length", pss.SaltLength)
			}
			scheme = tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgRSAPSS,
				Details: tpm2.NewTPMUSigScheme(tpm2.TPMAlgRSAPSS, &tpm2.TPMSSchemeHash{HashAlg: hashAlg})}
		} else {
			scheme = tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgRSASSA,
				Details: tpm2.NewTPMUSigScheme(tpm2.TPMAlgRSASSA, &tpm2.TPMSSchemeHash{HashAlg: hashAlg})}
		}
	}
	k.dev.mu.Lock()
	k.mu.Lock()
	if !k.loaded || k.dev.closed {
		k.mu.Unlock()
		k.dev.mu.Unlock()
		return nil, errors.New("tpm: sign: key closed")
	}
	auth := k.dev.auth()
	rsp, err := tpm2.Sign{
		KeyHandle:  tpm2.AuthHandle{Handle: k.handle, Name: k.name, Auth: auth},
		Digest:     tpm2.TPM2BDigest{Buffer: digest},
		InScheme:   scheme,
		Validation: tpm2.TPMTTKHashCheck{Tag: tpm2.TPMSTHashCheck, Hierarchy: tpm2.TPMRHNull},
	}.Execute(k.dev.l.with(ctx))
	err = k.dev.sessionErr("sign", auth, err)
	k.mu.Unlock()
	k.dev.mu.Unlock()
	if err != nil {
		return nil, err
	}
	var sig []byte
	switch k.alg {
	case ECCP256:
		e, err := rsp.Signature.Signature.ECDSA()
		if err != nil {
			return nil, fmt.Errorf("tpm: sign: %w", err)
		}
		sig, err = asn1.Marshal(struct{ R, S *big.Int }{new(big.Int).SetBytes(e.SignatureR.Buffer), new(big.Int).SetBytes(e.SignatureS.Buffer)})
		if err != nil {
			return nil, err
		}
		if !ecdsa.VerifyASN1(k.pub.(*ecdsa.PublicKey), digest, sig) {
			return nil, errors.New("tpm: sign: the TPM's ECDSA signature does not verify")
		}
	case RSA2048:
		var rs *tpm2.TPMSSignatureRSA
		if isPSS {
			rs, err = rsp.Signature.Signature.RSAPSS()
		} else {
			rs, err = rsp.Signature.Signature.RSASSA()
		}
		if err != nil {
			return nil, fmt.Errorf("tpm: sign: %w", err)
		}
		sig = rs.Sig.Buffer
		pub := k.pub.(*rsa.PublicKey)
		if isPSS {
			err = rsa.VerifyPSS(pub, h, digest, sig, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash})
		} else {
			err = rsa.VerifyPKCS1v15(pub, h, digest, sig)
		}
		if err != nil {
			return nil, fmt.Errorf("tpm: sign: the TPM's RSA signature does not verify: %w", err)
		}
	}
	return sig, nil
}

func hashAlgID(h crypto.Hash) (tpm2.TPMAlgID, error) {
	switch h {
	case crypto.SHA256:
		return tpm2.TPMAlgSHA256, nil
	case crypto.SHA384:
		return tpm2.TPMAlgSHA384, nil
	case crypto.SHA512:
		return tpm2.TPMAlgSHA512, nil
	case crypto.SHA1:
		return tpm2.TPMAlgSHA1, nil
	}
	return 0, fmt.Errorf("tpm: sign: hash %v not supported", h)
}

// PublicFromPEM returns the public key inside a TSS2 PRIVATE KEY file (from its public area, no TPM needed), or of a
// PEM private key (PKCS#8, SEC1 EC, PKCS#1 RSA).
func PublicFromPEM(pemBytes []byte) (crypto.PublicKey, error) {
	blk, _ := pem.Decode(pemBytes)
	if blk == nil {
		return nil, errors.New("tpm: no PEM block")
	}
	if blk.Type == "TSS2 PRIVATE KEY" {
		tk, err := keyfile.Decode(pemBytes)
		if err != nil {
			return nil, fmt.Errorf("tpm: key file: %w", err)
		}
		return tk.PublicKey()
	}
	s, err := pemkey.Parse(blk)
	if err != nil {
		return nil, fmt.Errorf("tpm: %w", err)
	}
	return s.Public(), nil
}
