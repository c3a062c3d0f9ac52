package projector

// Queued returns how many events wait for a worker, for tests that must
// know that events will share a batch.
func (p *Projector) Queued() int { return len(p.items) }
