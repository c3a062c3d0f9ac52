package bus

import (
	"errors"
	"fmt"

	"github.com/ThreeDotsLabs/watermill/message"
)

// Stream entry fields of watermill-redisstream's default marshaller. An entry
// written by any Watermill redisstream publisher decodes here, and ours
// decode there.
const (
	fieldUUID     = "_watermill_message_uuid"
	fieldMetadata = "metadata"
	fieldPayload  = "payload"
	// fieldOrigin records where a retried entry came from; other decoders
	// ignore unknown fields.
	fieldOrigin = "_conveyor_origin"
)

// errUndecodable wraps every reason an entry cannot become a message.
var errUndecodable = errors.New("undecodable stream entry")

// marshalFields returns XADD field/value pairs for msg.
func marshalFields(msg *message.Message) ([]any, error) {
	if msg.Metadata.Get(fieldUUID) != "" {
		return nil, fmt.Errorf("metadata key %s is reserved", fieldUUID)
	}
	var md []byte
	if len(msg.Metadata) > 0 {
		md = encodeMetadata(msg.Metadata)
	}
	return []any{fieldUUID, msg.UUID, fieldMetadata, md, fieldPayload, []byte(msg.Payload)}, nil
}

// entryMessage is an entry's message before (or instead of) a Watermill
// message: the Router's handlers without middleware read it directly,
// which saves the metadata map and its lookups.
type entryMessage struct {
	uuid    string
	payload string
	// meta holds the metadata's keys and values, alternating.
	meta []string
}

// parseEntry decodes an entry's fields. Every failure wraps errUndecodable:
// such an entry is a permanent error and is dead-lettered.
func parseEntry(fields []string) (entryMessage, error) {
	var em entryMessage
	var md string
	for i := 0; i+1 < len(fields); i += 2 {
		switch fields[i] {
		case fieldUUID:
			em.uuid = fields[i+1]
		case fieldPayload:
			em.payload = fields[i+1]
		case fieldMetadata:
			md = fields[i+1]
		}
	}
	if em.uuid == "" {
		return em, fmt.Errorf("%w: field %s is missing", errUndecodable, fieldUUID)
	}
	if md != "" {
		meta, err := decodeMetadataPairs(md)
		if err != nil {
			return em, fmt.Errorf("%w: metadata: %v", errUndecodable, err)
		}
		em.meta = meta
	}
	return em, nil
}

// Get returns the metadata value of key ("" if unset), as
// message.Metadata.Get does: of a key given twice, the last.
func (em *entryMessage) Get(key string) string {
	for i := len(em.meta) - 2; i >= 0; i -= 2 {
		if em.meta[i] == key {
			return em.meta[i+1]
		}
	}
	return ""
}

// message returns em as a Watermill message. A lean message is built
// without Ack and Nack channels, which Watermill creates on the first Ack
// or Nack when they are missing. It is for the Router, which learns each
// outcome from the handler's return and never waits on the channels; it
// saves two channels per delivery.
func (em *entryMessage) message(lean bool) *message.Message {
	meta := make(message.Metadata, len(em.meta)/2)
	for i := 0; i+1 < len(em.meta); i += 2 {
		meta[em.meta[i]] = em.meta[i+1]
	}
	if lean {
		return &message.Message{UUID: em.uuid, Metadata: meta, Payload: []byte(em.payload)}
	}
	msg := message.NewMessage(em.uuid, []byte(em.payload))
	msg.Metadata = meta
	return msg
}
