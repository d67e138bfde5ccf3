package main

// Certificates and keys for the embedded control plane.
//
// The sandbox CA (cert + key) is made by the Python launcher and passed in;
// everything here is signed by it, so one CA file is enough for every client
// (kubectl, the operator, curl against the OIDC discovery endpoints) to verify
// the API server, and the API server trusts every client cert we mint.
//
// Leaf keys are ECDSA P-256: generation is instant, which keeps start-up fast
// (we re-mint leaves on every start so a rotated CA is picked up for free).
// The service-account key must be RSA-2048 (the launcher and the Entra emulator
// expect RS256 JWKS) and is reused across restarts so tokens stay verifiable.

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"

	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"k8s.io/client-go/util/keyutil"
)

// ca is the loaded sandbox CA.
type ca struct {
	cert    *x509.Certificate
	certPEM []byte
	key     crypto.Signer
}

// loadCA reads and checks the sandbox CA; every failure here is a user error
// (wrong path, key that does not match, a leaf instead of a CA).
func loadCA(certPath, keyPath string) (*ca, error) {
	certPEM, err := os.ReadFile(certPath)
	if err != nil {
		return nil, fmt.Errorf("cannot read --ca-cert: %w", err)
	}
	block, _ := pem.Decode(certPEM)
	for block != nil && block.Type != "CERTIFICATE" {
		block, _ = pem.Decode(nil)
	}
	if block == nil {
		return nil, fmt.Errorf("--ca-cert %s holds no PEM CERTIFICATE block", certPath)
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("--ca-cert %s is not a valid X.509 certificate: %w", certPath, err)
	}
	if !cert.BasicConstraintsValid || !cert.IsCA {
		return nil, fmt.Errorf("--ca-cert %s is not a CA certificate (basicConstraints CA:TRUE missing)", certPath)
	}
	now := time.Now()
	if now.Before(cert.NotBefore) || now.After(cert.NotAfter) {
		return nil, fmt.Errorf("--ca-cert %s is not valid now (valid %s to %s)", certPath, cert.NotBefore.Format(time.RFC3339), cert.NotAfter.Format(time.RFC3339))
	}
	keyPEM, err := os.ReadFile(keyPath)
	if err != nil {
		return nil, fmt.Errorf("cannot read --ca-key: %w", err)
	}
	// keyutil handles "RSA PRIVATE KEY" (PKCS1), "EC PRIVATE KEY" (SEC1) and "PRIVATE KEY" (PKCS8).
	k, err := keyutil.ParsePrivateKeyPEM(keyPEM)
	if err != nil {
		return nil, fmt.Errorf("--ca-key %s is not a PEM RSA/ECDSA private key: %w", keyPath, err)
	}
	signer, ok := k.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("--ca-key %s: unsupported key type %T", keyPath, k)
	}
	if !publicKeysEqual(cert.PublicKey, signer.Public()) {
		return nil, fmt.Errorf("--ca-key %s does not match --ca-cert %s", keyPath, certPath)
	}
	// Re-encode only the certificate so the kubeconfig CA data is clean PEM.
	return &ca{cert: cert, certPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw}), key: signer}, nil
}

func publicKeysEqual(a, b crypto.PublicKey) bool {
	type equaler interface{ Equal(crypto.PublicKey) bool }
	ea, ok := a.(equaler)
	return ok && ea.Equal(b)
}

// leaf is a freshly minted certificate + key in PEM.
type leaf struct {
	certPEM, keyPEM []byte
}

func (c *ca) issue(cn string, orgs []string, server bool, dns []string, ips []net.IP) (*leaf, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 126))
	if err != nil {
		return nil, err
	}
	notAfter := time.Now().Add(365 * 24 * time.Hour)
	if notAfter.After(c.cert.NotAfter) {
		notAfter = c.cert.NotAfter // a leaf must not outlive its CA
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: cn, Organization: orgs},
		NotBefore:             time.Now().Add(-5 * time.Minute), // tolerate small clock skew
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		DNSNames:              dns,
		IPAddresses:           ips,
	}
	if server {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
	} else {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.cert, key.Public(), c.key)
	if err != nil {
		return nil, fmt.Errorf("signing %q with the sandbox CA: %w", cn, err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	return &leaf{
		certPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		keyPEM:  pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}),
	}, nil
}

// ensureSAKey returns the path of an RSA-2048 service-account key in dir,
// creating it only if absent: tokens minted before a restart stay valid.
func ensureSAKey(dir string) (string, error) {
	p := filepath.Join(dir, "sa.key")
	if b, err := os.ReadFile(p); err == nil {
		k, perr := keyutil.ParsePrivateKeyPEM(b)
		if perr == nil {
			if _, ok := k.(*rsa.PrivateKey); ok {
				return p, nil
			}
		}
		return "", fmt.Errorf("%s exists but is not an RSA private key; delete it to have a new one made", p)
	} else if !errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("cannot read %s: %w", p, err)
	}
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return "", err
	}
	der := x509.MarshalPKCS1PrivateKey(k)
	if err := writeFileAtomic(p, pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		return "", err
	}
	return p, nil
}

// writeKubeconfig writes a self-contained kubeconfig (CA, client cert and key
// embedded), so the file alone is enough for kubectl/kopf/client-go.
func writeKubeconfig(path, server string, caPEM []byte, user string, l *leaf) error {
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["sandbox"] = &clientcmdapi.Cluster{Server: server, CertificateAuthorityData: caPEM}
	cfg.AuthInfos[user] = &clientcmdapi.AuthInfo{ClientCertificateData: l.certPEM, ClientKeyData: l.keyPEM}
	cfg.Contexts["sandbox"] = &clientcmdapi.Context{Cluster: "sandbox", AuthInfo: user, Namespace: "default"}
	cfg.CurrentContext = "sandbox"
	b, err := clientcmd.Write(*cfg)
	if err != nil {
		return err
	}
	return writeFileAtomic(path, b, 0o600)
}

// writeFileAtomic writes via a temp file + rename so a reader (the launcher
// polling the state dir) never sees a half-written file.
func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Chmod(mode); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
