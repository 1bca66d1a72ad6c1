"""Using a trained adapter: the chat session, batch prediction and what to load for them."""
