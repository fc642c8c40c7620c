// Package pemkey reads unencrypted PEM private keys: the one parser behind the station CA's key files (station/ca,
// which adds encrypted PKCS#8) and the units' software keys (tpm). Both are leaves, which may not import each other.
package pemkey

import (
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"fmt"
)

// Parse reads the private key in blk: PKCS#8 "PRIVATE KEY", SEC1 "EC PRIVATE KEY" or PKCS#1 "RSA PRIVATE KEY" (not
// legacy-encrypted). Its errors say what is wrong in a few words, for the caller to prefix and wrap.
func Parse(blk *pem.Block) (crypto.Signer, error) {
	var key any
	var err error
	switch blk.Type {
	case "PRIVATE KEY":
		key, err = x509.ParsePKCS8PrivateKey(blk.Bytes)
	case "EC PRIVATE KEY":
		key, err = x509.ParseECPrivateKey(blk.Bytes)
	case "RSA PRIVATE KEY":
		if blk.Headers["Proc-Type"] != "" {
			return nil, fmt.Errorf("legacy encrypted PEM is not supported, convert with `openssl pkcs8 -topk8`")
		}
		key, err = x509.ParsePKCS1PrivateKey(blk.Bytes)
	default:
		return nil, fmt.Errorf("PEM block %q is not a private key", blk.Type)
	}
	if err != nil {
		return nil, fmt.Errorf("parse key: %v", err)
	}
	return Signer(key)
}

// Signer is key as a crypto.Signer, or an error naming its type.
func Signer(key any) (crypto.Signer, error) {
	s, ok := key.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("key type %T cannot sign", key)
	}
	return s, nil
}
