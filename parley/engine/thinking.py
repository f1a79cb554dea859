"""Where a thinking model's sequence stands while it decodes (types.Reasoning)."""

from __future__ import annotations

from dataclasses import dataclass, field

from parley.types import Reasoning


@dataclass
class ThinkingState:
    """Where a thinking model's sequence stands (types.Reasoning): its phase ("maybe" it opens a
    thinking with its next token, "thinking", "answer"), the tokens it thought and answered, and
    the close still to force once the budget is spent."""

    rules: Reasoning
    phase: str
    thought: int = 0
    answered: int = 0
    forced: list[int] = field(default_factory=list)

    @classmethod
    def start(cls, rules: Reasoning) -> ThinkingState:
        state = cls(rules, rules.phase)
        state._force_if_spent()
        return state

    def mask_edit(self) -> tuple[str, int] | None:
        """How the next token's allowed set differs from the grammar's: ("only", t), ("also", t) or
        ("not", t)."""
        if self.forced:
            return "only", self.forced[0]
        if self.phase == "maybe":  # the first token may open a thinking, unless there is no room for one
            return ("not", self.rules.start_id) if self.rules.budget == 0 else ("also", self.rules.start_id)
        return None

    def constrains_answer(self) -> bool:
        """The grammar's mask applies to the next token (when it "maybe" opens a thinking, with the
        start marker allowed besides); a thinking is free."""
        return self.phase != "thinking"

    def advance(self, token_id: int) -> bool:
        """Take the next token; True if it belongs to the answer (so the grammar must accept it)."""
        if self.forced and token_id == self.forced[0]:
            self.forced.pop(0)
        if self.phase == "maybe":
            self.phase = "thinking" if token_id == self.rules.start_id else "answer"
        elif self.phase == "thinking" and token_id == self.rules.end_id:
            self.phase = "answer"
            self.thought += 1
            self.forced = []
            return False
        if self.phase == "answer":
            self.answered += 1
            return True
        self.thought += 1
        self._force_if_spent()
        return False

    def answer_spent(self) -> bool:
        return self.rules.max_answer_tokens is not None and self.answered >= self.rules.max_answer_tokens

    def _force_if_spent(self) -> None:
        budget, close = self.rules.budget, self.rules.close_ids
        if self.phase == "thinking" and budget is not None and not self.forced and self.thought + len(close) >= budget:
            self.forced = list(close)
