package bus

import (
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/redis/go-redis/v9"
)

// unmarshalFields turns an entry's fields into a Watermill message, as a
// delivery does.
func unmarshalFields(fields []string, lean bool) (*message.Message, error) {
	em, err := parseEntry(fields)
	if err != nil {
		return nil, err
	}
	return em.message(lean), nil
}

// UnmarshalForTest decodes a stream entry read with go-redis as the
// subscriber does.
func UnmarshalForTest(x redis.XMessage) (*message.Message, error) {
	return unmarshalFields(fromXMessages([]redis.XMessage{x})[0].fields, false)
}
