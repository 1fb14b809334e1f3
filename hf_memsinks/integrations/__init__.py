"""Training stacks: ``Trainer`` (:mod:`.trainer`), TRL's ``SFTTrainer`` (:mod:`.sft`, needs ``trl``)
and PEFT adapters (:mod:`.peft`)."""
