package main

import (
	"bytes"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"unicode"
)

// repoRoot is the repository's top directory (this package is cmd/provision).
const repoRoot = "../.."

// markdownFiles are the documents checked: the README and every page of docs/.
func markdownFiles(t *testing.T) []string {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(repoRoot, "docs", "*.md"))
	if err != nil {
		t.Fatal(err)
	}
	if len(files) == 0 {
		t.Fatal("docs/*.md: no pages; the README points at docs/")
	}
	return append([]string{filepath.Join(repoRoot, "README.md")}, files...)
}

var (
	mdLink      = regexp.MustCompile(`\]\(([^)\s]+)\)`)
	docsPath    = regexp.MustCompile(`\bdocs/[A-Za-z0-9._/#-]*[A-Za-z0-9_/]`)
	mdName      = regexp.MustCompile(`[A-Za-z0-9_./-]*[A-Za-z0-9_-]\.md\b`)
	codeSpan    = regexp.MustCompile("`([^`\n]+)`")
	headingLine = regexp.MustCompile(`(?m)^#{1,6}\s+(.+?)\s*#*\s*$`)
	fencedBlock = regexp.MustCompile("(?ms)^```.*?^```")
)

// slug is the anchor GitHub gives a heading: lowercase, punctuation dropped, spaces to hyphens.
func slug(heading string) string {
	var b strings.Builder
	for _, r := range strings.ToLower(heading) {
		switch {
		case r == ' ':
			b.WriteRune('-')
		case r == '-' || r == '_' || unicode.IsLetter(r) || unicode.IsDigit(r):
			b.WriteRune(r)
		}
	}
	return b.String()
}

func anchors(t *testing.T, file string) []string {
	t.Helper()
	data, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, m := range headingLine.FindAllStringSubmatch(string(fencedBlock.ReplaceAll(data, nil)), -1) {
		out = append(out, slug(m[1]))
	}
	return out
}

// TestDocsReferences fails on a dangling reference in README.md and docs/*.md: a relative link (and its #anchor) to a
// file or heading that is not there, a docs/... path that does not exist, a *.md file named that the repository does
// not hold, or a `path` in code spans under one of the repository's top-level directories that does not exist.
func TestDocsReferences(t *testing.T) {
	top, err := os.ReadDir(repoRoot)
	if err != nil {
		t.Fatal(err)
	}
	topDirs := map[string]bool{}
	for _, e := range top {
		if e.IsDir() && e.Name() != ".git" {
			topDirs[e.Name()] = true
		}
	}
	exists := func(p string) bool { _, err := os.Stat(p); return err == nil }
	for _, file := range markdownFiles(t) {
		rel, _ := filepath.Rel(repoRoot, file)
		data, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		text := string(data)
		dir := filepath.Dir(file)

		for _, m := range mdLink.FindAllStringSubmatch(text, -1) {
			link := m[1]
			if strings.Contains(link, "://") || strings.HasPrefix(link, "mailto:") {
				continue
			}
			target, anchor, _ := strings.Cut(link, "#")
			path := file
			if target != "" {
				path = filepath.Join(dir, target)
				if !exists(path) {
					t.Errorf("%s: link %q: %s does not exist", rel, link, path)
					continue
				}
			}
			if anchor != "" && strings.HasSuffix(path, ".md") && !slices.Contains(anchors(t, path), anchor) {
				t.Errorf("%s: link %q: no heading with anchor #%s in %s (anchors: %v)", rel, link, anchor, path, anchors(t, path))
			}
		}

		for _, p := range docsPath.FindAllString(text, -1) {
			p, _, _ = strings.Cut(p, "#")
			if !exists(filepath.Join(repoRoot, p)) {
				t.Errorf("%s: mentions %s, which does not exist", rel, p)
			}
		}

		for _, name := range mdName.FindAllString(text, -1) {
			if strings.Contains(name, "://") || bytes.Contains([]byte(name), contractsWord) && pendingContractsPointers[filepath.ToSlash(rel)] > 0 {
				continue // TestNoPointerOutsideRepository keeps the list of these
			}
			if !exists(filepath.Join(dir, name)) && !exists(filepath.Join(repoRoot, name)) {
				t.Errorf("%s: mentions %s, which is not in the repository", rel, name)
			}
		}

		for _, m := range codeSpan.FindAllStringSubmatch(text, -1) {
			p := m[1]
			first, _, ok := strings.Cut(p, "/")
			if !ok || !topDirs[first] || strings.ContainsAny(p, " <>{}*|$") {
				continue
			}
			if !exists(filepath.Join(repoRoot, strings.TrimSuffix(p, "/"))) {
				t.Errorf("%s: mentions `%s`, which does not exist in the repository", rel, p)
			}
		}
	}
}

// TestDocsGoReferences: a docs/... page named in the code (comments, help texts) exists.
func TestDocsGoReferences(t *testing.T) {
	err := filepath.WalkDir(repoRoot, func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (d.Name() == ".git" || d.Name() == "testdata") {
			return filepath.SkipDir
		}
		if d.IsDir() || !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "docs_test.go") {
			return nil
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		for _, p := range docsPath.FindAllString(string(data), -1) {
			p, _, _ = strings.Cut(p, "#")
			if _, err := os.Stat(filepath.Join(repoRoot, p)); err != nil {
				rel, _ := filepath.Rel(repoRoot, path)
				t.Errorf("%s: mentions %s, which does not exist", rel, p)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// contractsWord is the name of the planning file that lives outside the repository; the repository states its
// contracts in docs/ and must never point there. (Spelled in two parts so this file does not match itself.)
var contractsWord = []byte("CONTR" + "ACTS")

// pendingContractsPointers are the files outside this package's ownership that still pointed at the outside file when
// docs/ was written, with how many lines did. Whoever replaces a pointer removes its entry: the test fails on an entry
// that no longer matches, so the list only shrinks.
var pendingContractsPointers = map[string]int{}

// TestNoPointerOutsideRepository: no file in the repository points at the planning file outside it (or ../shared).
func TestNoPointerOutsideRepository(t *testing.T) {
	found := map[string]int{}
	err := filepath.WalkDir(repoRoot, func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && d.Name() == ".git" {
			return filepath.SkipDir
		}
		if d.IsDir() || strings.HasSuffix(path, "docs_test.go") {
			return nil
		}
		if strings.HasPrefix(d.Name(), "NOTES-") && filepath.Dir(path) == filepath.Clean(repoRoot) {
			return nil // helpers' notes to the lead, merged into README and docs/, not documentation themselves
		}
		if info, err := d.Info(); err != nil || info.Size() > 1<<20 {
			return err
		}
		data, err := os.ReadFile(path)
		if err != nil || bytes.IndexByte(data, 0) >= 0 {
			return err // binary files cannot point anywhere a reader follows
		}
		rel, _ := filepath.Rel(repoRoot, path)
		for i, line := range bytes.Split(data, []byte("\n")) {
			if bytes.Contains(line, contractsWord) || bytes.Contains(line, []byte("../shared")) {
				found[filepath.ToSlash(rel)]++
				if _, pending := pendingContractsPointers[filepath.ToSlash(rel)]; !pending {
					t.Errorf("%s:%d points outside the repository (%s): say it in docs/ and point there", rel, i+1, strings.TrimSpace(string(line)))
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for file, n := range pendingContractsPointers {
		if found[file] != n {
			t.Errorf("%s: %d line(s) point outside the repository, pendingContractsPointers says %d: update the list (remove the entry once it is 0)", file, found[file], n)
		}
	}
}
