"""The Flask docs' Celery pattern ("Background Tasks with Celery"), as a user has it.

``create_app()`` builds the app; ``celery_init_app(app)`` the Celery app,
configured from ``app.config["CELERY"]``, whose tasks run inside the app
context. Settings come from ``FLASK_``-prefixed environment variables
(``FLASK_SQLALCHEMY_DATABASE_URI``, ``FLASK_CELERY__broker_url``, ...).
examples/flask/stock/ is the app as the docs leave it; examples/flask/ is
the same app with the lines of README "Use it in your own app" added.
"""

from celery import Celery, Task
from flask import Flask

from jobapp import models


def create_app() -> Flask:
    app = Flask(__name__)
    app.config.from_mapping(
        SQLALCHEMY_DATABASE_URI="postgresql+psycopg://localhost/jobapp",
        CELERY=dict(
            broker_url="amqp://localhost",
            result_backend="db+postgresql+psycopg://localhost/jobapp",
            task_ignore_result=True,
            beat_schedule={"cleanup": {"task": "jobapp.tasks.cleanup", "schedule": 15.0}},
        ),
    )
    app.config.from_prefixed_env()
    models.init_app(app)
    celery_init_app(app)

    from jobapp import views

    app.register_blueprint(views.bp)
    return app


def celery_init_app(app: Flask) -> Celery:
    class FlaskTask(Task):
        def __call__(self, *args: object, **kwargs: object) -> object:
            with app.app_context():
                return self.run(*args, **kwargs)

    celery_app = Celery(app.name, task_cls=FlaskTask)
    celery_app.config_from_object(app.config["CELERY"])
    celery_app.set_default()
    app.extensions["celery"] = celery_app
    return celery_app
