package testutil

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// SSHD is an OpenSSH server a test started on a loopback port, letting in the current user with a throw-away key:
// a unit on a fixture as the station reaches it (ssh UNIT tpm2_send).
type SSHD struct {
	Host string   // 127.0.0.1
	Port int      // the port it listens on
	User string   // the user it lets in: the one running the test
	Args []string // an ssh client's words up to and including USER@HOST; append the remote command
	Log  *LockedBuffer
	cmd  *exec.Cmd
}

// sshdPath is Debian's OpenSSH server (openssh-server); sshd re-executes itself and wants an absolute path.
const sshdPath = "/usr/sbin/sshd"

// StartSSHD starts /usr/sbin/sshd (openssh-server) on a free loopback port with its own configuration, a throw-away
// ed25519 host key and a throw-away client key in a temp dir, as the current user (root or not: a non-root sshd lets in
// only that user). It stops at test cleanup. Missing sshd or ssh skips the test while CI is unset.
func StartSSHD(tb testing.TB) *SSHD {
	tb.Helper()
	if _, err := os.Stat(sshdPath); err != nil {
		RequireFacility(tb, false, "%s (openssh-server) not installed", sshdPath)
	}
	RequireTool(tb, "ssh", "ssh-keygen")
	me, err := user.Current()
	if err != nil {
		tb.Fatal(err)
	}
	if os.Geteuid() == 0 {
		// The privilege-separation directory the Debian package creates at boot (tmpfiles); absent in containers.
		if err := os.MkdirAll("/run/sshd", 0o755); err != nil {
			tb.Fatal(err)
		}
	}
	dir := tb.TempDir()
	keygen := func(name string) {
		tb.Helper()
		if out, err := exec.Command("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", filepath.Join(dir, name)).CombinedOutput(); err != nil {
			tb.Fatalf("ssh-keygen: %v: %s", err, out)
		}
	}
	keygen("host_key")
	keygen("client_key")
	hostPub, err := os.ReadFile(filepath.Join(dir, "host_key.pub"))
	if err != nil {
		tb.Fatal(err)
	}
	clientPub, err := os.ReadFile(filepath.Join(dir, "client_key.pub"))
	if err != nil {
		tb.Fatal(err)
	}
	authorized := filepath.Join(dir, "authorized_keys")
	if err := os.WriteFile(authorized, clientPub, 0o600); err != nil {
		tb.Fatal(err)
	}
	for attempt := 0; ; attempt++ {
		s := &SSHD{Host: "127.0.0.1", Port: FreePort(tb), User: me.Username, Log: &LockedBuffer{}}
		knownHosts := filepath.Join(dir, "known_hosts")
		f := strings.Fields(string(hostPub))
		if err := os.WriteFile(knownHosts, fmt.Appendf(nil, "[%s]:%d %s %s\n", s.Host, s.Port, f[0], f[1]), 0o600); err != nil {
			tb.Fatal(err)
		}
		cfg := filepath.Join(dir, "sshd_config")
		conf := fmt.Sprintf(`ListenAddress %s
Port %d
HostKey %s
AuthorizedKeysFile %s
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
AllowUsers %s
StrictModes no
PidFile none
UsePAM no
LogLevel ERROR
`, s.Host, s.Port, filepath.Join(dir, "host_key"), authorized, me.Username)
		if err := os.WriteFile(cfg, []byte(conf), 0o600); err != nil {
			tb.Fatal(err)
		}
		s.Args = []string{"ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
			"-o", "UserKnownHostsFile=" + knownHosts, "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR",
			"-i", filepath.Join(dir, "client_key"), "-p", strconv.Itoa(s.Port), s.User + "@" + s.Host}
		s.cmd = exec.Command(sshdPath, "-D", "-e", "-f", cfg)
		s.cmd.Stdout, s.cmd.Stderr = s.Log, s.Log
		if err := s.cmd.Start(); err != nil {
			tb.Fatalf("sshd: %v", err)
		}
		done := make(chan struct{})
		go func() { s.cmd.Wait(); close(done) }()
		up := false
	wait:
		for i := 0; i < 200 && !up; i++ { // about five seconds
			select {
			case <-done: // the port was taken in the meantime, or the configuration is refused
				break wait
			default:
				up = listening(s.Port, 1)
			}
		}
		if up {
			tb.Cleanup(func() {
				s.KillSessions(tb)
				s.cmd.Process.Kill()
				<-done
			})
			return s
		}
		s.cmd.Process.Kill()
		<-done
		if attempt == 3 {
			tb.Fatalf("sshd did not come up on port %d:\n%s", s.Port, s.Log.String())
		}
	}
}

// Command is Args as one command line (words with blanks or quotes single-quoted), for a cmd: TPM URI.
func (s *SSHD) Command() string {
	var b strings.Builder
	for i, a := range s.Args {
		if i > 0 {
			b.WriteByte(' ')
		}
		if a != "" && !strings.ContainsAny(a, " \t\n'\"\\$`;&|<>(){}*?#~") {
			b.WriteString(a)
			continue
		}
		b.WriteString("'" + strings.ReplaceAll(a, "'", `'\''`) + "'")
	}
	return b.String()
}

// KillSessions kills (SIGKILL) every process the server started for its connections, and their children: the
// connection breaks as when a unit is unplugged. The server itself keeps listening.
func (s *SSHD) KillSessions(tb testing.TB) {
	tb.Helper()
	for _, pid := range descendants(s.cmd.Process.Pid) {
		syscall.Kill(pid, syscall.SIGKILL)
	}
	// Wait (about two seconds) until they are gone, so the next connection meets no leftovers.
	for i := 0; i < 100 && len(descendants(s.cmd.Process.Pid)) > 0; i++ {
		time.Sleep(20 * time.Millisecond)
	}
}

// descendants lists the processes below pid (from /proc), deepest first.
func descendants(pid int) []int {
	entries, _ := os.ReadDir("/proc")
	children := map[int][]int{}
	for _, e := range entries {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		stat, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// pid (comm) state ppid …: comm may hold blanks and parentheses, so read after the last ')'.
		i := bytes.LastIndexByte(stat, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(string(stat[i+1:]))
		if len(f) < 2 || f[0] == "Z" {
			continue
		}
		if ppid, err := strconv.Atoi(f[1]); err == nil {
			children[ppid] = append(children[ppid], p)
		}
	}
	var out []int
	var walk func(int)
	walk = func(p int) {
		for _, c := range children[p] {
			walk(c)
			out = append(out, c)
		}
	}
	walk(pid)
	return out
}
