"""The commands after training, and the launcher: `finetune chat` (`chat`), `eval`, `bench`, `compare`, `merge`,
`sync`, `launch`."""
