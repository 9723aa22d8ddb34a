"""nipype workflow builders of qsmflow (installed as ``qsmflow.workflows``)."""
