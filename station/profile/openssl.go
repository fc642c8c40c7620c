package profile

import (
	"bufio"
	"bytes"
	"fmt"
	"strconv"
	"strings"
)

// The forms of OpenSSL configuration a profile can write for a TPM key (tpm_openssl:). They differ in what the
// device's OpenSSL stack needs to sign with a TSS2 key file:
//
//   - provider: tpm2-openssl 1.2 or later (Debian 13): the tpm2 provider next to the default one, no
//     default_properties, the kernel resource manager as TCTI (device:/dev/tpmrm0).
//   - provider-abrmd: tpm2-openssl 1.1 (Debian 12): the same providers plus default_properties =
//     ?provider=tpm2,tpm2.digest!=yes, and tpm2-abrmd as TCTI (tabrmd:bus_type=system). Through /dev/tpmrm0 it runs
//     out of object slots, and without the properties a client such as Mender fails to finalize its signature.
//   - engine: OpenSSL 1.1 clients with the tpm2-tss engine.
//   - none: the profile writes no OpenSSL configuration.
//
// auto (the default, also when tpm_openssl is not set) reads the tpm2-openssl version from the image's package
// database when the image is written.
const (
	OpenSSLAuto          = "auto"
	OpenSSLProvider      = "provider"
	OpenSSLProviderABRMD = "provider-abrmd"
	OpenSSLEngine        = "engine"
	OpenSSLNone          = "none"
)

// OpenSSLForms are the values tpm_openssl accepts.
var OpenSSLForms = []string{OpenSSLAuto, OpenSSLProvider, OpenSSLProviderABRMD, OpenSSLEngine, OpenSSLNone}

// DpkgStatus is where Debian-family root file systems keep their package database.
const DpkgStatus = "/var/lib/dpkg/status"

// OpenSSLChoice is the OpenSSL form written for a TPM key, and why.
type OpenSSLChoice struct {
	Form    string // provider, provider-abrmd, engine or none; "" when no TPM key
	Reason  string // e.g. "tpm2-openssl 1.1.1-1 in /var/lib/dpkg/status"
	Warning string // set when the form is a guess or the image lacks what the form needs
	Auto    bool   // chosen from the image (tpm_openssl auto); false when the profile forces the form
}

// String says which form and why, for step details and verify: "tpm2-openssl 1.1.1-1 in /var/lib/dpkg/status →
// provider-abrmd", with the warning appended when there is one.
func (c OpenSSLChoice) String() string {
	if c.Form == "" {
		return ""
	}
	s := c.Reason + " → " + c.Form
	if c.Warning != "" {
		s += " (warning: " + c.Warning + ")"
	}
	return s
}

// forcedOpenSSL is the provisional choice for a TPM key before the image is read.
func forcedOpenSSL(profile, value string) OpenSSLChoice {
	if value == "" || value == OpenSSLAuto {
		return OpenSSLChoice{Form: OpenSSLProvider, Reason: "tpm_openssl auto, image not read yet", Auto: true}
	}
	return OpenSSLChoice{Form: value, Reason: fmt.Sprintf("tpm_openssl: %s in profile %s", value, profile)}
}

// dpkgPackage is one installed package of a dpkg status file.
type dpkgPackage struct {
	Version string
}

// parseDpkgStatus returns the installed packages of a dpkg status file (Status "install ok installed"), by name.
// Multi-arch packages of the same name keep the first version seen.
func parseDpkgStatus(data []byte) map[string]dpkgPackage {
	out := map[string]dpkgPackage{}
	var name, version, status string
	flush := func() {
		if name != "" && strings.HasSuffix(status, " installed") {
			if _, seen := out[name]; !seen {
				out[name] = dpkgPackage{Version: version}
			}
		}
		name, version, status = "", "", ""
	}
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.TrimSpace(line) == "" {
			flush()
			continue
		}
		if line[0] == ' ' || line[0] == '\t' {
			continue // continuation of a multi-line field
		}
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		v = strings.TrimSpace(v)
		switch k {
		case "Package":
			name = v
		case "Version":
			version = v
		case "Status":
			status = v
		}
	}
	flush()
	return out
}

// InstalledVersion is the version of an installed package (Status "install ok installed") in a dpkg status file's
// contents; ok is false when the package is not installed.
func InstalledVersion(status []byte, name string) (version string, ok bool) {
	p, ok := parseDpkgStatus(status)[name]
	return p.Version, ok
}

// upstreamAtLeast reports whether a Debian version's upstream part ([epoch:]upstream[-revision]) is at least
// major.minor. ok is false when the version has no leading numeric major.minor.
func upstreamAtLeast(version string, major, minor int) (atLeast, ok bool) {
	v := version
	if i := strings.IndexByte(v, ':'); i >= 0 {
		v = v[i+1:]
	}
	if i := strings.LastIndexByte(v, '-'); i >= 0 {
		v = v[:i]
	}
	var nums []int
	for _, part := range strings.SplitN(v, ".", 3) {
		end := 0
		for end < len(part) && part[end] >= '0' && part[end] <= '9' {
			end++
		}
		if end == 0 {
			break
		}
		n, err := strconv.Atoi(part[:end])
		if err != nil {
			break
		}
		nums = append(nums, n)
		if end < len(part) {
			break
		}
	}
	if len(nums) == 0 {
		return false, false
	}
	if len(nums) == 1 {
		nums = append(nums, 0)
	}
	if nums[0] != major {
		return nums[0] > major, true
	}
	return nums[1] >= minor, true
}

// OpenSSLFromDpkg chooses the form from a root file system's package database; where names the file in messages
// ("/var/lib/dpkg/status" or "/var/lib/dpkg/status (partition 2)").
func OpenSSLFromDpkg(data []byte, where string) OpenSSLChoice {
	pkgs := parseDpkgStatus(data)
	c := OpenSSLChoice{Auto: true}
	if p, ok := pkgs["tpm2-openssl"]; ok {
		c.Reason = fmt.Sprintf("tpm2-openssl %s in %s", p.Version, where)
		newer, ok := upstreamAtLeast(p.Version, 1, 2)
		switch {
		case !ok:
			c.Form = OpenSSLProvider
			c.Warning = fmt.Sprintf("version %q not understood; assumed 1.2 or later: set tpm_openssl in the profile", p.Version)
		case newer:
			c.Form = OpenSSLProvider
		default:
			c.Form = OpenSSLProviderABRMD
			if _, ok := pkgs["tpm2-abrmd"]; !ok {
				c.Warning = "tpm2-abrmd is not installed in the image, and tpm2-openssl 1.1 needs it: add it to the image"
			}
		}
		return c
	}
	for _, engine := range []string{"libengine-tpm2-tss-openssl", "tpm2-tss-engine"} {
		if p, ok := pkgs[engine]; ok {
			c.Form, c.Reason = OpenSSLEngine, fmt.Sprintf("%s %s and no tpm2-openssl in %s", engine, p.Version, where)
			return c
		}
	}
	c.Form = OpenSSLProvider
	c.Reason = "no tpm2-openssl in " + where
	c.Warning = "the image has no tpm2-openssl and no tpm2-tss engine, so its client cannot use the TPM key: add tpm2-openssl to the image, or set tpm_openssl in the profile"
	return c
}

// OpenSSLUnknown is the choice when the package database cannot be read: provider, with a warning.
func OpenSSLUnknown(why string) OpenSSLChoice {
	return OpenSSLChoice{Form: OpenSSLProvider, Auto: true, Reason: "tpm2-openssl version unknown (" + why + ")",
		Warning: "assumed tpm2-openssl 1.2 or later; on a Debian 12 userland set tpm_openssl: provider-abrmd in the profile"}
}
