import CloudInit
import Foundation
import Libvirt
import Logging
import PoolAPI
import Support

extension Agent {
    /// Sends queued reports oldest first; an unreachable pool is retried
    /// with capped exponential backoff and jitter, so nothing is lost or
    /// reordered while it is down.
    func outboxLoop() async {
        var backoff = Backoff()
        while !Task.isCancelled {
            let next: PendingReport?
            do {
                next = try await store.nextPending()
            } catch {
                logger.error("cannot read the report queue: \(error)")
                try? await Task.sleep(for: backoff.next())
                continue
            }
            guard let next else {
                await outboxWakeup.wait(timeout: .seconds(30))
                continue
            }
            do {
                logger.debug("delivering report \(next.sequence): \(next.report.name) state \(next.report.state.rawValue)", metadata: ["instance": "\(next.report.name)"])
                _ = try await client.report(next.report)
                try await store.delivered(next, at: Date())
                logger.debug("delivered report \(next.sequence)")
                backoff.reset()
            } catch let error as PoolClientError {
                switch error {
                case .refused(502, _), .refused(503, _):
                    // The pool kept the report; it only had no start parameters.
                    try? await store.delivered(next, at: Date())
                    backoff.reset()
                case .refused(let status, let message) where status != 401 && status != 409 && !error.isTransient:
                    logger.error("the pool refused the report of \(next.report.name) (\(status)): \(message); dropped", metadata: ["instance": "\(next.report.name)"])
                    try? await store.delivered(next, at: Date())
                default:
                    let delay = backoff.next()
                    logger.warning("report of \(next.report.name) not delivered: \(error); next try in \(delay)", metadata: ["instance": "\(next.report.name)"])
                    try? await Task.sleep(for: delay)
                }
            } catch {
                logger.error("cannot finish delivering a report: \(error)")
                try? await Task.sleep(for: backoff.next())
            }
        }
    }
}
