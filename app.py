"""The page of `captioner serve`, on its own: Hugging Face Spaces runs this file (`python app.py` works too).

The REST API needs `captioner serve`; this is the browser UI only, with the same batcher and example photos."""
from captioner.pipeline import Captioner
from captioner.serve import Batcher, build_ui, example_photos

demo = build_ui(Batcher(Captioner.from_pretrained()), example_photos())

if __name__ == "__main__":
    demo.launch()
