"""Speed kernels the model is patched with: LoRA layers (`lora_layers`), RMSNorm (`norms`), the chunked loss
(`chunked_loss`)."""
