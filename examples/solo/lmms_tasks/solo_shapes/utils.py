"""lmms-eval hooks of the solo_shapes tasks: images from data/, answers scored as the CPU demo scores them.

Scoring is written out here rather than imported from megatron.solo.demo.evaluate, so the test that both agree
compares two implementations: equal after stripping, lower-casing and dropping a final full stop.
"""

from pathlib import Path

from PIL import Image

DATA = Path(__file__).resolve().parent / "data"


def doc_to_visual(doc):
    with Image.open(DATA / doc["image"]) as img:
        img.load()  # read before the file closes; the model's processor converts the mode
        return [img]


def label_prompt(doc):
    return ""  # the pretraining format: the label follows the image directly


def question_prompt(doc):
    return doc["question"]


def doc_to_choice(doc):
    return list(doc["choices"])


def choice_target(doc):
    return doc["choices"].index(doc["answer"])


def _norm(text):
    return " ".join(text.strip().lower().rstrip(".").split())


def label_results(doc, results):
    truth, answer = _norm(doc["label"]), _norm(results[0])
    return {
        "label_accuracy": float(truth == answer),
        "colour_accuracy": float(answer.split()[:1] == truth.split()[:1]),
        "shape_accuracy": float(answer.split()[1:] == truth.split()[1:]),
    }


def answer_results(doc, results):
    return {"answer_accuracy": float(_norm(results[0]) == _norm(doc["answer"]))}
