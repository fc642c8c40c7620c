package label_test

import (
	"fmt"
	"strings"

	"provision/label"
)

// The QR payload names the unit and its certificate; a scan is parsed back strictly.
func ExamplePayload() {
	sha := strings.Repeat("ab", 32)
	p := label.Payload("SN-0001", sha)
	serial, got, err := label.ParsePayload(p)
	fmt.Println(p[:20]+"…", serial, got == sha, err)
	_, _, err = label.ParsePayload("SN-0001")
	fmt.Println(err)
	// Output:
	// P1/SN-0001/ababababa… SN-0001 true <nil>
	// "SN-0001" does not start with P1/: not a label code
}
