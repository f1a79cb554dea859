"""OpenAI's Responses API (`/v1/responses`), translated at the edge."""
