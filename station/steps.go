package station

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"net/url"
	"time"

	"provision/station/ca"
	"provision/station/handshake"
	"provision/tpm"
)

// The steps of a unit's run that do not depend on where its identity goes: key, csr, sign, handshake. Each returns
// the detail shown to the operator and recorded in the audit log; the runner (pipeline.go) records the state.

func (r *run) stepKey(ctx context.Context) (string, error) {
	alg, err := tpm.ParseAlgorithm(r.s.Config.Key.Algorithm)
	if err != nil {
		return "", err
	}
	session := ""
	if r.dev.Kind() == tpm.KindTPM {
		if session, err = r.startSession(ctx); err != nil {
			return "", err
		}
	}
	k, err := r.dev.CreateKey(ctx, alg)
	if err != nil {
		return "", err
	}
	r.key, r.closeFn, r.keyKind, r.keyFile = k, k.Close, k.Kind(), k.FileName()
	r.res.KeyKind = k.Kind()
	if r.pubSHA, err = publicSHA256(k.Public()); err != nil {
		return "", err
	}
	if r.keyPEM, err = k.PEM(); err != nil {
		return "", fmt.Errorf("export key file: %w", err)
	}
	detail := fmt.Sprintf("%s %s key %s", k.Kind(), alg, r.pubSHA[:16])
	if session != "" {
		detail += "; " + session
	}
	return detail, nil
}

// startSession salts the TPM's HMAC session to the unit's EK before anything is created, so the path to the TPM (a
// fixture's network, ssh) can neither read nor forge what matters (tpm.Device.StartSession): the EK of the certificate
// the attest step checks (pickEKCert: the same choice), or, when the TPM has no usable EK certificate, the default EK,
// trusted on first use. The EK certificates read here are kept for the attest step. It returns what the step detail
// says about the session.
func (r *run) startSession(ctx context.Context) (string, error) {
	if r.dev.InSession() { // a Device that serves several units (enroll --serials) keeps its session
		src, index := r.dev.SessionEK()
		return sessionDetail(src, index, ""), nil
	}
	certs, chain, err := r.dev.EKCertificates(ctx)
	if err != nil {
		return "", err
	}
	r.att = &attestation{nv: &ekNV{certs: certs, chain: chain}}
	cert, index, _ := pickEKCert(certs)
	why := ""
	switch {
	case cert == nil && len(certs) == 0:
		why = "no EK certificate"
	case cert == nil:
		why = "no EK certificate parses"
	default:
		err = r.dev.StartSession(ctx, index, cert.PublicKey)
		if !errors.Is(err, tpm.ErrEKMismatch) {
			if err != nil {
				return "", err
			}
			src, index := r.dev.SessionEK()
			return sessionDetail(src, index, ""), nil
		}
		// The attest step judges a certificate that names another key (whatever its policy); until then the
		// session can only trust the EK the TPM has.
		why, index = fmt.Sprintf("the EK certificate at NV %#x names another key", index), 0
	}
	if err := r.dev.StartSession(ctx, 0, nil); err != nil {
		return "", err
	}
	src, _ := r.dev.SessionEK()
	return sessionDetail(src, index, why), nil
}

// sessionDetail says which EK the session is salted to, and why it is trusted on first use when it is.
func sessionDetail(source string, index uint32, tofu string) string {
	if index != 0 {
		return fmt.Sprintf("session: EK of NV %#x (%s)", index, source)
	}
	if tofu == "" {
		tofu = "no EK certificate"
	}
	return fmt.Sprintf("session: default EK (%s), %s: trusted on first use", source, tofu)
}

func (r *run) stepCSR(ctx context.Context) (string, error) {
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: r.subject,
		URIs: []*url.URL{SerialURI(r.req.Serial)}}, r.signer(ctx))
	if err != nil {
		return "", err
	}
	r.csr, err = x509.ParseCertificateRequest(der)
	return r.subject.String(), err
}

func (r *run) stepSign(ctx context.Context) (string, error) {
	uris := []*url.URL{SerialURI(r.req.Serial)}
	if r.att != nil && r.att.ekURI != nil {
		uris = append(uris, r.att.ekURI) // the unit's TPM, as step-ca's device attestation names it
	}
	cert, err := r.s.CA.Sign(ca.Request{CSR: r.csr, Subject: r.subject, URIs: uris,
		Validity: time.Duration(r.s.Config.Certificate.ValidityDays) * 24 * time.Hour, PublicKey: r.key.Public(),
		CRLDistributionPoints: r.s.Config.CRL.DistributionPoints()})
	if err != nil {
		if errors.Is(err, ca.ErrExpired) {
			return "", fmt.Errorf("%w: %w", ErrCA, err)
		}
		return "", err
	}
	r.res.Certificate, r.res.CertSHA256 = cert, ca.Fingerprint(cert)
	return "certificate " + CertSerial(cert), nil
}

func (r *run) stepHandshake(ctx context.Context) (string, error) {
	client := handshake.Client{Certificate: r.res.Certificate, Chain: []*x509.Certificate{r.s.CA.Issuing}, Key: r.signer(ctx),
		ClientID: r.req.Serial}
	hc := r.req.Handshake
	if len(hc.Endpoints) == 0 {
		srv, err := r.s.builtinServer()
		if err != nil {
			return "", err
		}
		done := srv.Expect(r.res.Certificate)
		defer done()
		res, err := handshake.Test(ctx, srv.URL(), srv.Roots(), client, hc.options()...)
		if err != nil {
			return "", err
		}
		r.res.Handshakes = append(r.res.Handshakes, HandshakeResult(res))
		return fmt.Sprintf("%s %s %s", res.Endpoint, res.TLSVersion, res.Detail), nil
	}
	roots := hc.CA
	if roots == nil {
		return "", fmt.Errorf("no CA to verify %s with (Station.HandshakeConfig resolves it): %w", hc.Endpoints[0], ErrEndpoint)
	}
	detail := ""
	for _, ep := range hc.Endpoints {
		res, err := handshake.Test(ctx, ep, roots, client, hc.options()...)
		if err != nil {
			return "", err
		}
		r.res.Handshakes = append(r.res.Handshakes, HandshakeResult(res))
		detail += fmt.Sprintf("%s %s %s; ", res.Endpoint, res.TLSVersion, res.Detail)
	}
	return detail[:len(detail)-2], nil
}

// builtinServer is the station's loopback mTLS test server, started on first use and shared by every unit.
func (s *Station) builtinServer() (*handshake.Server, error) {
	s.srvOnce.Do(func() {
		clientRoots := x509.NewCertPool()
		clientRoots.AddCert(s.CA.Root)
		s.srv, s.srvErr = handshake.NewServer(clientRoots)
	})
	return s.srv, s.srvErr
}

// publicSHA256 is the SHA-256 of a public key's PKIX DER, lowercase hex: the unit's key fingerprint.
func publicSHA256(pub crypto.PublicKey) (string, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:]), nil
}

// signer is the unit's key bound to ctx where the key supports it (TPM keys): a cancelled run stops a signature in
// flight instead of waiting for the TPM's command timeout.
func (r *run) signer(ctx context.Context) crypto.Signer {
	if k, ok := r.key.(interface {
		WithContext(context.Context) crypto.Signer
	}); ok {
		return k.WithContext(ctx)
	}
	return r.key
}
