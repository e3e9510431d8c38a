"""The testbed: tiny CONCH and tiny MiT towers pretrained offline on synthetic data, so that the
premises of L_sim (CONCH embeds tissue classes) and L_struct (the teacher sees regions) hold
at a scale a CPU can train and measure."""
