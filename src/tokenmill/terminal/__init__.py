"""Terminal front-ends for people: `tokenmill chat`, a conversation with a model in the terminal."""
