package server_test

import (
	"errors"
	"fmt"

	"provision/server"
)

// A listen address other than loopback needs TLS and client authentication: without them New refuses it, and the CLI
// exits 2.
func ExampleNew_insecure() {
	_, err := server.New(nil, server.Config{Listen: "0.0.0.0:8080"})
	fmt.Println(errors.Is(err, server.ErrInsecure))
	fmt.Println(err)
	// Output:
	// true
	// serve: listening on 0.0.0.0:8080 (not loopback) needs TLS (a certificate and its key) and client authentication (a client CA or a token file): insecure serve configuration
}
