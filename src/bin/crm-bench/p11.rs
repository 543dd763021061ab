//! P11 is not run by `crm-bench`: it needs a Python peer installed from PyPI. `crm-bench p11`
//! prints how to run it by hand; `crm-bench payme-load …` is the load generator both sides
//! are driven with (the same client as P7's CheckPerformTransaction sides).

use anyhow::{Context, bail};
use base64::{Engine, engine::general_purpose::STANDARD};

use crate::{
    client::{self, Spec},
    load,
    process::work_dir,
};

pub const INSTRUCTIONS: &str = r#"P11: our Payme CheckPerformTransaction vs the payme-pkg Django peer (must ≥ 10×, aim ≥ 20×).
Not run by crm-bench (it needs PyPI); by hand, on this machine, each side on one core (CPU 1),
the load generator on the other (CPU 0, `crm-bench payme-load` pins itself there).

1. The peer: payme-pkg 3.4.1, Django 5.2, SQLite, gunicorn gthread.
     python3 -m venv /tmp/p11 && . /tmp/p11/bin/activate
     pip install 'payme-pkg==3.4.1' 'Django>=5.2,<5.3' gunicorn
     django-admin startproject peer /tmp/p11/peer && cd /tmp/p11/peer
     python manage.py startapp orders
   orders/models.py:
     from django.db import models
     class Order(models.Model):
         total_amount = models.DecimalField(max_digits=12, decimal_places=2)
   peer/settings.py: add 'payme' and 'orders' to INSTALLED_APPS, DEBUG = False,
   ALLOWED_HOSTS = ['*'], and
     PAYME_ID = "587f72c72cac0d162c722ae2"
     PAYME_KEY = "bench-payme-key"
     PAYME_ACCOUNT_FIELD = "id"
     PAYME_AMOUNT_FIELD = "total_amount"
     PAYME_ACCOUNT_MODEL = "orders.models.Order"
     PAYME_ONE_TIME_PAYMENT = True
   peer/urls.py:
     from payme.views import PaymeWebHookAPIView
     urlpatterns = [path("payments/payme/", PaymeWebHookAPIView.as_view())]
   then:
     python manage.py makemigrations orders && python manage.py migrate
     python manage.py shell -c "from orders.models import Order; print(Order.objects.create(total_amount=5000).id)"
   (5000 som = 500000 tiyin; payme-pkg compares the order's amount × 100 with Payme's.)
     taskset -c 1 gunicorn peer.wsgi -k gthread -w 2 --threads 4 -b 127.0.0.1:8000 --log-level warning
   (payme-pkg's own docs are the reference if a setting name differs in 3.4.1.)

2. Drive it (repeat a few times, alternating with step 3):
     target/release/crm-bench payme-load --addr 127.0.0.1:8000 --path /payments/payme/ \
         --account-field id --order 1 --amount 500000 --key bench-payme-key --secs 10
   It prints calls/s, p50, p99 and fails if any answer is not a Payme success
   ({"result": {"allow": true}}).

3. Ours, the same way: `crm-bench p7 --rounds 6` prints our CheckPerformTransaction calls/s
   (server on CPU 1, SQLite, one tokio worker, the same client). P11's ratio is ours over
   the peer's, both measured in the same session.
"#;

/// `crm-bench payme-load --addr H:P [--path P] [--account-field F] --order ID --amount A
/// [--login L] --key K [--connections N] [--warmup S] [--secs S]`: CheckPerformTransaction
/// in a closed loop, pinned to the load CPU.
pub fn payme_load(args: &[String]) -> anyhow::Result<()> {
    let value = |name: &str| -> Option<&str> {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map(String::as_str)
    };
    let required = |name: &str| value(name).with_context(|| format!("{name} is required"));
    let number = |name: &str, default: f64| -> anyhow::Result<f64> {
        value(name).map_or(Ok(default), |v| v.parse().context(name.to_owned()))
    };
    let login = value("--login").unwrap_or("Paycom");
    let key = required("--key")?;
    let spec = client::Payme {
        addr: required("--addr")?.to_owned(),
        path: value("--path").unwrap_or("/webhooks/payme").to_owned(),
        authorization: format!("Basic {}", STANDARD.encode(format!("{login}:{key}"))),
        connections: number("--connections", 32.0)? as usize,
        warmup: number("--warmup", 2.0)?,
        secs: number("--secs", 10.0)?,
        amount: number("--amount", 500_000.0)? as i64,
        account_field: value("--account-field").unwrap_or("order_id").to_owned(),
        mode: client::PaymeMode::Check,
        invoices: vec![required("--order")?.to_owned()],
        id_prefix: "00000000".into(),
    };
    let work = work_dir()?;
    let report = load::run_client(&work, &Spec::Payme(spec));
    let _ = std::fs::remove_dir_all(&work);
    let report = report?;
    let w = report.windows.first().cloned().unwrap_or_default();
    println!(
        "{:.0} calls/s  p50 {:.2} ms  p99 {:.2} ms  ({} answered, {} errors)",
        report.per_s,
        w.p50_us / 1000.0,
        w.p99_us / 1000.0,
        report.acked,
        report.errors
    );
    if report.errors > 0 {
        bail!(
            "answers that were not Payme successes: {:?}",
            report.error_samples
        );
    }
    Ok(())
}
