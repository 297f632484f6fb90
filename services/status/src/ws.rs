//! One WebSocket client: replay, then live events, with keep-alive pings.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message, WebSocket, close_code};
use tokio::time::{Instant, MissedTickBehavior, interval_at, timeout};
use tokio_util::sync::CancellationToken;

use crate::hub::{Frame, Subscription};

/// Proxies and load balancers commonly drop connections idle for 30 to 60 s; a ping every
/// 25 s keeps a quiet subscription open through them.
pub const PING_INTERVAL: Duration = Duration::from_secs(25);

/// A send that takes longer than this means the client stopped reading (its TCP window is
/// full); it is then as good as gone, and holding its connection open helps no one.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Bound on sending the close frame itself, which may also hit a full window.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Close reason for a subscriber that fell behind (at most 123 bytes, per RFC 6455).
pub const TOO_SLOW: &str = "too slow: the client fell too far behind the event stream";

/// Close reason on shutdown.
const SHUTTING_DOWN: &str = "status service shutting down";

/// Serves one client until it leaves, falls behind, or the service shuts down.
pub(crate) async fn session(
    mut socket: WebSocket,
    mut subscription: Subscription,
    shutdown: CancellationToken,
) {
    for frame in std::mem::take(&mut subscription.replay) {
        if let Err(reason) = send(&mut socket, frame).await {
            return finish(socket, reason).await;
        }
    }
    let mut ping = interval_at(Instant::now() + PING_INTERVAL, PING_INTERVAL);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let reason = loop {
        // Biased: shutdown and overflow win over draining more frames to a slow client.
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break Some((close_code::AWAY, SHUTTING_DOWN)),
            () = subscription.too_slow.cancelled() => break Some((close_code::POLICY, TOO_SLOW)),
            frame = subscription.live.recv() => match frame {
                Some(frame) => {
                    if let Err(reason) = send(&mut socket, frame).await {
                        break reason;
                    }
                }
                // The hub let go of this subscriber, which it only does when it overflowed.
                None => break Some((close_code::POLICY, TOO_SLOW)),
            },
            _ = ping.tick() => {
                if let Err(reason) = send_message(&mut socket, Message::Ping(Bytes::new())).await {
                    break reason;
                }
            }
            incoming = socket.recv() => match incoming {
                // The client closed (axum answers the close frame) or the connection broke.
                Some(Ok(Message::Close(_)) | Err(_)) | None => break None,
                // Clients have nothing to say; pings are answered by the WebSocket layer.
                Some(Ok(_)) => {}
            },
        }
    };
    finish(socket, reason).await;
}

/// Why a session ends: a close frame to send, or `None` when the connection is already gone.
type Ending = Option<(u16, &'static str)>;

async fn send(socket: &mut WebSocket, frame: Frame) -> Result<(), Ending> {
    send_message(socket, Message::Text(frame.as_ref().into())).await
}

async fn send_message(socket: &mut WebSocket, message: Message) -> Result<(), Ending> {
    match timeout(SEND_TIMEOUT, socket.send(message)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => {
            tracing::debug!(%error, "websocket send failed; client gone");
            Err(None)
        }
        Err(_) => Err(Some((close_code::POLICY, TOO_SLOW))),
    }
}

async fn finish(mut socket: WebSocket, ending: Ending) {
    if let Some((code, reason)) = ending {
        if reason == TOO_SLOW {
            tracing::warn!("closing a websocket subscriber that fell behind");
        }
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        let _ = timeout(CLOSE_TIMEOUT, socket.send(Message::Close(Some(frame)))).await;
    }
}
