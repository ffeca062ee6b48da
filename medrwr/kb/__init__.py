"""The shipped default medical knowledge base: a data product built on the retrieval layer."""
