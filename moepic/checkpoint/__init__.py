"""Reading Hugging Face model folders into moepic's canonical spec and weights."""
