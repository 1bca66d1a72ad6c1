"""Training data: local and hub files, chat conversations, tokenisation, packing and collation."""
