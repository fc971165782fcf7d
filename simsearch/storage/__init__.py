"""The index folder's durable state: the SQLite store and its schema."""
