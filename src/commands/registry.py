"""Extra commands that live beside the Lightning subcommands in ``python -m src.cli``.

Each entry maps a command name to ``"module:function"``; the function takes the remaining argv
(``list[str]``) and returns an exit code. Modules are imported only when their command runs, so
``python -m src.cli fit`` does not pay for them.
"""

EXTRA_COMMANDS: dict[str, tuple[str, str]] = {
    # name: ("module:function", one-line help)
    "generate-camer": (
        "src.data.camer.generate_command:main",
        "write the synthetic CA-MER data set",
    ),
    "compare": ("src.commands.compare:main", "compare MLflow runs grouped by a parameter"),
    "build-camer": (
        "src.data.camer.build_command:main",
        "build the CA-MER manifest from annotations",
    ),
    "score": ("src.evaluation.score:main", "compute every metric from a predictions file"),
    "extract": ("src.commands.extract:main", "run encoders over clips, write the feature store"),
    "export": ("src.commands.export:main", "export adapter weights (peft LoRA folder, MoSE)"),
    "convert-emotion-llama": (
        "src.commands.convert_emotion_llama:main",
        "convert Emotion-LLaMA's released checkpoint into a checkpoint and configs",
    ),
}
