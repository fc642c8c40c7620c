package server

import (
	"crypto/sha256"
	"crypto/subtle"
	"fmt"
	"net/http"
	"os"
	"strings"
	"time"
)

// tokenCookie carries the token for browsers, which cannot send an Authorization header on a page load: the login
// form (POST /login) sets it, HttpOnly, Secure and SameSite=Strict.
const tokenCookie = "provision_token"

// minTokenLen is the shortest token accepted: a token is a secret, not a password to remember.
const minTokenLen = 16

// loadToken reads the bearer token (trimmed) from a file only its owner may read, and keeps its SHA-256.
func loadToken(path string) ([]byte, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("serve: token file: %w", err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("serve: token file %s is readable by group or others (mode %v; chmod 600 it): %w",
			path, fi.Mode().Perm(), ErrInsecure)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("serve: token file: %w", err)
	}
	tok := strings.TrimSpace(string(b))
	if len(tok) < minTokenLen {
		return nil, fmt.Errorf("serve: token file %s: the token must be at least %d characters: %w", path, minTokenLen, ErrInsecure)
	}
	sum := sha256.Sum256([]byte(tok))
	return sum[:], nil
}

// tokenOK compares a presented token with the configured one in constant time (over their hashes, so the length
// does not leak either).
func (s *Server) tokenOK(presented string) bool {
	sum := sha256.Sum256([]byte(presented))
	return subtle.ConstantTimeCompare(sum[:], s.token) == 1
}

// requireToken lets a request through when it carries the token as "Authorization: Bearer …" or in the login cookie.
// Otherwise the API and metrics answer 401 (JSON or text), and a page answers 401 with the login form.
func (s *Server) requireToken(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/login" && r.Method == http.MethodPost {
			s.login(w, r)
			return
		}
		if strings.HasPrefix(r.URL.Path, "/static/") {
			next.ServeHTTP(w, r) // the stylesheet, so the login form is styled
			return
		}
		presented, ok := "", false
		if h := r.Header.Get("Authorization"); h != "" {
			scheme, tok, _ := strings.Cut(h, " ")
			presented, ok = strings.TrimSpace(tok), strings.EqualFold(scheme, "Bearer")
		} else if c, err := r.Cookie(tokenCookie); err == nil {
			presented, ok = c.Value, true
		}
		if ok && s.tokenOK(presented) {
			next.ServeHTTP(w, r)
			return
		}
		w.Header().Set("WWW-Authenticate", `Bearer realm="provision"`)
		switch {
		case strings.HasPrefix(r.URL.Path, "/api/"):
			writeError(w, http.StatusUnauthorized, "a valid bearer token is required")
		case r.URL.Path == "/" && r.Method == http.MethodGet:
			s.renderLogin(w, http.StatusUnauthorized, "")
		default:
			http.Error(w, "a valid bearer token is required", http.StatusUnauthorized)
		}
	})
}

// login checks the token a browser posted and, when right, keeps it in a cookie and goes to the dashboard.
func (s *Server) login(w http.ResponseWriter, r *http.Request) {
	r.Body = http.MaxBytesReader(w, r.Body, 4<<10)
	if err := r.ParseForm(); err != nil || !s.tokenOK(strings.TrimSpace(r.PostForm.Get("token"))) {
		s.renderLogin(w, http.StatusUnauthorized, "That token is not right.")
		return
	}
	http.SetCookie(w, &http.Cookie{Name: tokenCookie, Value: strings.TrimSpace(r.PostForm.Get("token")), Path: "/",
		MaxAge: int((12 * time.Hour).Seconds()), HttpOnly: true, Secure: s.tls != nil, SameSite: http.SameSiteStrictMode})
	http.Redirect(w, r, "/", http.StatusSeeOther)
}
