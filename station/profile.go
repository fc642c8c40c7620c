package station

import "provision/station/profile"

// ErrProfile: a profile is malformed or refers to something that does not exist. The same sentinel as
// profile.ErrProfile, kept here because callers of ResolveProfile branch on it.
var ErrProfile = profile.ErrProfile

// ResolveProfile finds a profile by name ("" is station.yaml profile:): the station's own (station.yaml profiles:,
// applied over its base) or a built-in.
func (c *Config) ResolveProfile(name string) (*profile.Profile, error) {
	if name == "" {
		name = c.Profile
	}
	return profile.Resolve(name, c.Profiles)
}
