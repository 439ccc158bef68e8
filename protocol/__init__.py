"""The wire protocol below the HTTP layer: OpenAI request/response Structs and the one error tree."""
