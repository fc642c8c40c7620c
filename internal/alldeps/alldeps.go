// Package alldeps pins every chosen dependency while the packages that use them are being written.
// Remove it once each module is imported by real code.
package alldeps

import (
	_ "github.com/charmbracelet/bubbles/spinner"
	_ "github.com/charmbracelet/bubbletea"
	_ "github.com/charmbracelet/lipgloss"
	_ "github.com/charmbracelet/x/exp/teatest"
	_ "github.com/diskfs/go-diskfs"
	_ "github.com/eclipse/paho.golang/paho"
	_ "github.com/foxboron/go-tpm-keyfiles"
	_ "github.com/go-playground/validator/v10"
	_ "github.com/goccy/go-yaml"
	_ "github.com/google/go-cmp/cmp"
	_ "github.com/google/go-tpm-tools/simulator"
	_ "github.com/google/go-tpm/tpm2"
	_ "github.com/google/go-tpm/tpm2/transport/linuxtpm"
	_ "github.com/google/go-tpm/tpm2/transport/tcp"
	_ "github.com/rogpeppe/go-internal/testscript"
	_ "github.com/spf13/cobra"
	_ "github.com/youmark/pkcs8"
	_ "modernc.org/sqlite"
)
