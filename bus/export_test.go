package bus

import "github.com/ThreeDotsLabs/watermill/message"

// UnmarshalForTest decodes stream entry values as the subscriber does.
func UnmarshalForTest(values map[string]any) (*message.Message, error) {
	return unmarshalFields(values)
}
