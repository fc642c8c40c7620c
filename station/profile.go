package station

import (
	"sync"

	"provision/station/profile"
)

// ErrProfile: a profile is malformed or refers to something that does not exist. The same sentinel as
// profile.ErrProfile, kept here because callers of ResolveProfile branch on it.
var ErrProfile = profile.ErrProfile

// profileCache holds the profiles a Config resolved: resolving parses the built-in YAML and merges bases, and a unit
// needs its profile several times (validate, pre-flight, image, verify). Resolved profiles are never modified.
type profileCache struct {
	mu       sync.Mutex
	resolved map[string]*profile.Profile
}

// ResolveProfile finds a profile by name ("" is station.yaml profile:): the station's own (station.yaml profiles:,
// applied over its base) or a built-in. The result is shared: callers must not modify it.
func (c *Config) ResolveProfile(name string) (*profile.Profile, error) {
	if name == "" {
		name = c.Profile
	}
	if c.profiles == nil { // a Config not made by ParseConfig
		return profile.Resolve(name, c.Profiles)
	}
	c.profiles.mu.Lock()
	defer c.profiles.mu.Unlock()
	if p, ok := c.profiles.resolved[name]; ok {
		return p, nil
	}
	p, err := profile.Resolve(name, c.Profiles)
	if err != nil {
		return nil, err
	}
	if c.profiles.resolved == nil {
		c.profiles.resolved = map[string]*profile.Profile{}
	}
	c.profiles.resolved[name] = p
	return p, nil
}
