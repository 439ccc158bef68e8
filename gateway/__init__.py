"""The HTTP face of pointsman: Litestar app factory, thin handlers, CLI, OpenAI protocol types and errors."""
