package image

import (
	"fmt"
	"strconv"
	"strings"
)

// Partition selection: selectors ("2", "name=", "label=", "type=") resolved against the image's table, and the check
// that a Partition handed back to the image is one of its own.

// Select resolves a selector: "2" (partition number), "name=rootfs" (GPT name), "label=data" (file system label;
// FAT labels match regardless of case) or "type=<GPT type GUID or MBR type in hex>". A selector matching several
// partitions is an error.
func (im *Image) Select(sel string) (Partition, error) {
	k, v, hasEq := strings.Cut(strings.TrimSpace(sel), "=")
	if !hasEq {
		v = k
		k = "number"
	}
	var match []Partition
	for _, p := range im.parts {
		ok := false
		switch k {
		case "number":
			n, err := strconv.Atoi(v)
			ok = err == nil && p.Number == n
		case "name":
			ok = p.Name != "" && p.Name == v
		case "label":
			ok = p.Label != "" && (p.Label == v || p.FS == "vfat" && strings.EqualFold(p.Label, v))
		case "type":
			ok = sameType(p.Type, v)
		default:
			return Partition{}, fmt.Errorf("image %s: selector %q: want a number, name=, label= or type=: %w", im.path, sel, ErrNoPartition)
		}
		if ok {
			match = append(match, p)
		}
	}
	switch len(match) {
	case 0:
		return Partition{}, fmt.Errorf("image %s: %w: %q (%s table; %s)", im.path, ErrNoPartition, sel, im.table, im.describe())
	case 1:
		return match[0], nil
	}
	return Partition{}, fmt.Errorf("image %s: %w: %q matches %d partitions, be more specific", im.path, ErrNoPartition, sel, len(match))
}

// sameType compares partition types: GUIDs regardless of case, MBR types as hex numbers ("c", "0c", "0x0C").
func sameType(have, want string) bool {
	if strings.EqualFold(have, want) {
		return true
	}
	if len(have) != 2 {
		return false
	}
	a, err1 := strconv.ParseUint(have, 16, 8)
	b, err2 := strconv.ParseUint(strings.TrimPrefix(strings.ToLower(want), "0x"), 16, 8)
	return err1 == nil && err2 == nil && a == b
}

func (im *Image) describe() string {
	var s []string
	for _, p := range im.parts {
		d := strconv.Itoa(p.Number)
		if p.Name != "" {
			d += " name=" + p.Name
		}
		if p.FS != "" {
			d += " " + p.FS
		}
		if p.Label != "" {
			d += " label=" + p.Label
		}
		s = append(s, d)
	}
	return "partitions: " + strings.Join(s, ", ")
}

// own returns the image's own record of p, refusing a Partition that is not from this image's table.
func (im *Image) own(p Partition) (Partition, error) {
	for _, q := range im.parts {
		if q.Number == p.Number {
			if q.Start != p.Start || q.Size != p.Size {
				break
			}
			return q, nil
		}
	}
	return Partition{}, fmt.Errorf("image %s: %w: partition %d (%d bytes at %d) is not in this image's table", im.path, ErrNoPartition, p.Number, p.Size, p.Start)
}
