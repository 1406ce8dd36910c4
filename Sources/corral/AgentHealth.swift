import Agent
import Foundation
import Libvirt
import NIOSSL
import Support

/// `corral agent status --check`: what a supervisor or a monitoring probe
/// asks of an appliance. Each check prints one line, `ok NAME: ...` or
/// `FAIL NAME: ...`; the problems are returned.
enum AgentHealth {
    static func check(configuration: AgentConfiguration, store: AgentStore, maxOutboxAge: Int) async -> [String] {
        var problems: [String] = []
        func line(_ name: String, _ problem: String?, ok: String) {
            if let problem {
                problems.append(problem)
                print("FAIL \(name): \(problem)")
            } else {
                print("ok \(name): \(ok)")
            }
        }
        // libvirt: its daemon answers on the configured URI.
        do {
            let connection = try await Connection.open(configuration.libvirtURI, readOnly: true, keepAlive: nil)
            let version = try? await connection.libvirtVersion()
            await connection.close()
            line("libvirt", nil, ok: "\(configuration.libvirtURI) answers" + (version.map { " (libvirt \($0))" } ?? ""))
        } catch {
            let reason = (error as? LibvirtError)?.message ?? "\(error)"
            line("libvirt", "\(configuration.libvirtURI) does not answer: \(reason)", ok: "")
        }
        // The pool: it answers and knows this appliance's token.
        line("pool", await poolProblem(configuration), ok: "\(configuration.poolURL) accepts this appliance's token")
        // The outbox: reports the pool has not taken yet.
        do {
            let pending = try await store.pending(limit: 1000)
            if let oldest = pending.first {
                let age = Int(Date().timeIntervalSince(oldest.createdAt))
                line(
                    "outbox", age > maxOutboxAge ? "\(pending.count) reports undelivered, the oldest \(age) s old (more than \(maxOutboxAge) s)" : nil,
                    ok: "\(pending.count) reports waiting, the oldest \(age) s old")
            } else {
                line("outbox", nil, ok: "empty")
            }
        } catch {
            line("outbox", "the agent's state cannot be read: \(error)", ok: "")
        }
        return problems
    }

    /// Why the pool cannot be used by this agent, or nil.
    static func poolProblem(_ configuration: AgentConfiguration) async -> String? {
        let token: String
        do { token = try configuration.readToken() } catch let error as ConfigurationError { return error.reason } catch { return "\(error)" }
        var tls: TLSConfiguration?
        if let caFile = configuration.caFile {
            do { tls = try PoolClient.tlsConfiguration(trusting: caFile) } catch { return "pool.ca_file: \(error)" }
        }
        let client = PoolClient(baseURL: configuration.poolURL, token: token, version: Agent.version, timeout: .seconds(10), tls: tls)
        do {
            _ = try await client.authorize()
            await client.shutdown()
            return nil
        } catch PoolClientError.refused(let status, let message) {
            await client.shutdown()
            return "\(configuration.poolURL) refused this appliance (\(status)): \(message.prefix(200))"
        } catch {
            await client.shutdown()
            return "\(configuration.poolURL) does not answer: \(error)"
        }
    }
}
