package profile

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
)

// MergeJSON sets keys into a JSON object, recursively for objects, keeping every other key as it was.
// The result is indented with two spaces, as mender.conf usually is.
func MergeJSON(orig []byte, set map[string]any) ([]byte, error) {
	var doc map[string]any
	if len(bytes.TrimSpace(orig)) == 0 {
		doc = map[string]any{}
	} else {
		dec := json.NewDecoder(bytes.NewReader(orig))
		dec.UseNumber()
		if err := dec.Decode(&doc); err != nil {
			return nil, fmt.Errorf("not a JSON object: %w", err)
		}
		if dec.More() {
			return nil, errors.New("not a JSON object: trailing data")
		}
		if doc == nil {
			return nil, errors.New("not a JSON object: null")
		}
	}
	mergeInto(doc, set)
	out, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(out, '\n'), nil
}

func mergeInto(dst, src map[string]any) {
	for k, v := range src {
		if sv, ok := v.(map[string]any); ok {
			if dv, ok := dst[k].(map[string]any); ok {
				mergeInto(dv, sv)
				continue
			}
		}
		dst[k] = v
	}
}
