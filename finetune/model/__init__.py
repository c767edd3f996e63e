"""The model: loading it quantized and with LoRA (`load`), GGUF files in (`gguf`), the Hugging Face Hub (`hub`,
`finetune download`)."""
