"""Data: loading and checking datasets, chat-template labelling (`chat_templates`), tokenized examples with answer-
only labels (`load`), padding-free batches (`padding_free`)."""
