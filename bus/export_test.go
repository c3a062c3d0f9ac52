package bus

import (
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/redis/go-redis/v9"
)

// UnmarshalForTest decodes a stream entry read with go-redis as the
// subscriber does.
func UnmarshalForTest(x redis.XMessage) (*message.Message, error) {
	return unmarshalFields(fromXMessages([]redis.XMessage{x})[0].fields, false)
}
