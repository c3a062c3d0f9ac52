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

// unmarshalFields decodes an entry's values. Every failure wraps
// errUndecodable: such an entry is a permanent error and is dead-lettered.
func unmarshalFields(values map[string]any) (*message.Message, error) {
	uuid, ok := values[fieldUUID].(string)
	if !ok || uuid == "" {
		return nil, fmt.Errorf("%w: field %s is missing", errUndecodable, fieldUUID)
	}
	var payload string
	if p, ok := values[fieldPayload]; ok {
		if payload, ok = p.(string); !ok {
			return nil, fmt.Errorf("%w: field %s is not a string", errUndecodable, fieldPayload)
		}
	}
	msg := message.NewMessage(uuid, []byte(payload))
	if raw, ok := values[fieldMetadata]; ok {
		s, ok := raw.(string)
		if !ok {
			return nil, fmt.Errorf("%w: field %s is not a string", errUndecodable, fieldMetadata)
		}
		if s != "" {
			md, err := decodeMetadata(s)
			if err != nil {
				return nil, fmt.Errorf("%w: metadata: %v", errUndecodable, err)
			}
			msg.Metadata = md
		}
	}
	return msg, nil
}
