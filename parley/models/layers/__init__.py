"""What the model families share: rotary embeddings, the decoder layer (attention, norms, gated MLP)
and the stack around it, and sparse mixture-of-experts. A family file picks and arranges them."""
