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

// unmarshalFields decodes an entry's fields. Every failure wraps
// errUndecodable: such an entry is a permanent error and is dead-lettered.
//
// A lean message is built without Ack and Nack channels, which Watermill
// creates on the first Ack or Nack when they are missing. It is for the
// Router, which learns each outcome from the handler's return and never
// waits on the channels; it saves two channels per delivery.
func unmarshalFields(fields []string, lean bool) (*message.Message, error) {
	var uuid, payload, md string
	for i := 0; i+1 < len(fields); i += 2 {
		switch fields[i] {
		case fieldUUID:
			uuid = fields[i+1]
		case fieldPayload:
			payload = fields[i+1]
		case fieldMetadata:
			md = fields[i+1]
		}
	}
	if uuid == "" {
		return nil, fmt.Errorf("%w: field %s is missing", errUndecodable, fieldUUID)
	}
	var meta message.Metadata
	if md != "" {
		m, err := decodeMetadata(md)
		if err != nil {
			return nil, fmt.Errorf("%w: metadata: %v", errUndecodable, err)
		}
		meta = m
	}
	if lean {
		if meta == nil {
			meta = message.Metadata{}
		}
		return &message.Message{UUID: uuid, Metadata: meta, Payload: []byte(payload)}, nil
	}
	msg := message.NewMessage(uuid, []byte(payload))
	if meta != nil {
		msg.Metadata = meta
	}
	return msg, nil
}
