"""GroundedPrompts: the ``--workload grounded`` prompts of ``llm-core bench``: chat requests that
ask the model to write out a paragraph given in the prompt, word for word or with its typos
fixed. The answer is mostly a copy of the input, as in summaries, edits of code or text and
retrieval-augmented answers: the workload that n-gram speculation (prompt lookup) is for.

Each prompt is one user message in the model's own chat template. The paragraph is a run of
consecutive sentences of a built-in text (or of a line of ``--dataset``), as many as fit the
``input_len`` tokens of the templated prompt; a seeded generator picks where the run starts,
the instruction, and which words get a typo, so a new ``round`` gives fresh prompts and the
same seed gives every system compared the same ones. Requests stop at the end of the answer
(EOS); ``--output-len`` only caps them.
"""

from __future__ import annotations

import pathlib
import re
from typing import Any

import numpy as np

from llm_core.benchmarks.prompts import read_texts

INSTRUCTIONS = (
    "Repeat the following paragraph exactly, word for word. Write only the paragraph.",
    "The following paragraph has a few typos. Write it out again in full with the typos "
    "corrected, changing nothing else.",
)

#: The built-in text the paragraphs are cut from: plain prose on everyday subjects.
TEXT = """\
The river town of Alder Creek grew up around a sawmill in the 1870s. Its first school was a \
single room above the general store. The first newspaper was printed on a hand press that had \
come west by wagon. When the railroad arrived in 1889, the town doubled in size within three \
years. The mill was rebuilt in brick after a fire in 1893, and it ran until the forests upstream \
were gone.
A good loaf of bread needs only flour, water, salt and yeast. The dough is mixed, left to rise \
until it has doubled, and then shaped by hand. A long, slow rise in a cool room gives the bread \
more flavour than a quick one in a warm kitchen. Bakers score the top of the loaf with a sharp \
blade so that it opens evenly in the oven. The crust is done when the loaf sounds hollow when \
tapped on the bottom.
Honey bees live in colonies of up to sixty thousand workers and a single queen. The workers \
gather nectar and pollen from flowers within a few kilometres of the hive. A bee that finds a \
rich patch of flowers tells the others where it is with a dance on the comb. The angle of the \
dance shows the direction of the flowers, and its length shows how far away they are. In winter \
the colony clusters together and keeps warm by shivering its flight muscles.
The lighthouse on the northern point was built of granite blocks cut from the hills behind the \
harbour. Its lamp burned whale oil at first, then kerosene, and finally electricity. For ninety \
years a keeper climbed the spiral stairs every evening to light it. The last keeper left in \
1968, when the light was made automatic. Today the keeper's cottage is a small museum that is \
open on summer weekends.
A bicycle chain wears slowly as its pins and rollers rub against each other. A worn chain \
stretches, and it begins to skip on the smaller sprockets. Riders can check the wear with a \
simple gauge or a ruler. Cleaning the chain and oiling it lightly every few hundred kilometres \
makes it last much longer. A chain that is replaced in time also saves the more expensive \
sprockets and chainrings.
The city library opened its doors in 1905 with four thousand books and two reading rooms. A \
children's room was added ten years later, with low shelves and small wooden chairs. During \
the winter the library stayed open late so that workers could read after their shifts. In the \
1970s the card catalogue was replaced by microfiche, and later by computers. The building was \
restored in 2010, and its painted ceiling can be seen again.
Tomatoes grow best in full sun and in soil that drains well. The seeds are sown indoors about \
six weeks before the last frost. Young plants are moved outside once the nights stay warm. Tall \
varieties need a stake or a cage to hold up the fruit. Watering at the base of the plant in the \
morning helps to keep the leaves dry and healthy.
The old observatory on the hill has a telescope with a lens forty centimetres across. It was \
made in Germany and shipped in pieces across the ocean in 1898. Astronomers used it to measure \
the positions of double stars for more than sixty years. The dome turns on iron wheels, and it \
is still moved by a hand crank. On clear nights in autumn the observatory invites visitors to \
look at the moon and the planets.
"""


class GroundedPrompts:
    """Makes ``num_prompts`` chat prompts (token ids) of at most about ``input_len`` tokens.

    ``path``: a text file whose lines (or JSONL ``prompt`` fields) are the paragraphs, used in
    order instead of runs of the built-in text (each cut to the whole sentences that fit).
    """

    def __init__(
        self,
        tokenizer: Any,
        input_len: int,
        seed: int = 0,
        path: str | pathlib.Path | None = None,
    ):
        if input_len < 1:
            raise ValueError(f"--input-len must be >= 1, got {input_len}")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "--workload grounded writes chat requests, and this model's tokenizer has no "
                "chat template"
            )
        self.tokenizer = tokenizer
        self.input_len = input_len
        self.seed = seed
        self.path = None if path is None else pathlib.Path(path)
        self._paragraphs = read_texts(self.path, "paragraph") if self.path is not None else None
        self._sentences = _sentences(TEXT)

    def make(self, num_prompts: int, round: int = 0) -> list[list[int]]:
        if num_prompts < 1:
            raise ValueError(f"the number of prompts must be >= 1, got {num_prompts}")
        rng = np.random.default_rng([self.seed, round])
        prompts = []
        for i in range(num_prompts):
            instruction = int(rng.integers(len(INSTRUCTIONS)))
            if self._paragraphs is not None:
                paragraph = self._paragraphs[(round * num_prompts + i) % len(self._paragraphs)]
                sentences = _sentences(paragraph)
            else:
                n = len(self._sentences)
                start = int(rng.integers(n))
                sentences = [self._sentences[(start + j) % n] for j in range(n)]
            if instruction == 1:
                sentences = [_with_typos(s, rng) for s in sentences]
            prompts.append(self._fit(instruction, sentences))
        return prompts

    def describe(self) -> str:
        source = f"paragraphs of {self.path}" if self.path is not None else "built-in paragraphs"
        return (
            f"grounded chat requests: repeat or fix typos in {source} (<= ~{self.input_len} "
            f"tokens each, seed {self.seed}), stopping at EOS"
        )

    def _fit(self, instruction: int, sentences: list[str]) -> list[int]:
        """The prompt of the longest leading run of ``sentences`` that fits ``input_len``."""
        best = self._encode(instruction, sentences[0])
        if len(best) > self.input_len:
            raise ValueError(
                f"--input-len {self.input_len} is too short for the grounded workload: a prompt "
                f"with one sentence takes {len(best)} tokens"
            )
        for count in range(2, len(sentences) + 1):
            ids = self._encode(instruction, " ".join(sentences[:count]))
            if len(ids) > self.input_len:
                break
            best = ids
        return best

    def _encode(self, instruction: int, paragraph: str) -> list[int]:
        message = f"{INSTRUCTIONS[instruction]}\n\n{paragraph}"
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], add_generation_prompt=True, tokenize=False
        )
        return list(self.tokenizer.encode(text, add_special_tokens=False))


def _with_typos(text: str, rng: np.random.Generator, every: int = 12) -> str:
    """About one word in ``every`` of five letters or more gets two inner letters swapped."""
    words = text.split(" ")
    for i, word in enumerate(words):
        if len(word) >= 5 and word.isalpha() and rng.random() < 1 / every:
            j = int(rng.integers(1, len(word) - 2))
            words[i] = word[:j] + word[j + 1] + word[j] + word[j + 2 :]
    return " ".join(words)


def _sentences(text: str) -> list[str]:
    return re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
