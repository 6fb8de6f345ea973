# Two commands, each from a fresh clone:
#   make quickstart   virtual environment, built-in dataset, training, evaluation, detection, loss plot
#   make test         virtual environment, then the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN := checkpoints/toy

.PHONY: quickstart test
quickstart: $(VENV)/.installed
	$(PY) create_data_lists.py --shapes data/shapes --output data/shapes_lists
	$(PY) train.py --preset toy --data-folder data/shapes_lists --out $(RUN) --overwrite
	$(PY) eval.py $(RUN)/checkpoint.pt
	$(PY) detect.py $(RUN)/checkpoint.pt data/shapes/JPEGImages/00040[1-6].jpg --out $(RUN)/detections
	@echo "Loss curve: $(RUN)/loss_curve.png  PR curves: $(RUN)/pr_curves.png  Detections: $(RUN)/detections/"

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	touch $@
