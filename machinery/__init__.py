"""What a real run needs beyond the method: hub downloads, hostile-file checks, the tokenizer.json implementation, the
MATH grader, checkpoints and resume. A reader learning the method can skip this folder: the card's four files
(lorasb.py, model.py, data.py, train_gsm8k.py) tell the method's story and call into it."""
