//go:build !wip

package station

// wipState holds nothing until the pipeline lands (temporary).
type wipState struct{}

func (s *Station) closeExtras() {}
