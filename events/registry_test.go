package events

import "testing"

// LatestVersion is the highest version registered, whatever the order of
// registration. Not parallel: it registers a type of its own for its
// duration, and parallel tests list the registered types.
func TestLatestVersion(t *testing.T) {
	const typ = "test.versioned"
	t.Cleanup(func() {
		delete(registry, specKey{typ, 1})
		delete(registry, specKey{typ, 2})
		delete(latest, typ)
	})
	register(Spec{typ, 2, func() Event { return new(EmailSent) }})
	register(Spec{typ, 1, func() Event { return new(EmailSent) }})
	if v := LatestVersion(typ); v != 2 {
		t.Errorf("LatestVersion after versions 2 and 1 = %d, want 2", v)
	}
	for _, typ := range []string{TypeEmailRequested, TypeEmailSent, TypeDocumentUploaded} {
		if v := LatestVersion(typ); v != 1 {
			t.Errorf("LatestVersion(%s) = %d, want 1", typ, v)
		}
	}
	if v := LatestVersion("nope.happened"); v != 0 {
		t.Errorf("LatestVersion of an unknown type = %d, want 0", v)
	}
}
