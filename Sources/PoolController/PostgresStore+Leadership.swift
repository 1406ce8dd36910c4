import Logging
import PostgresNIO

extension PostgresStore {
    /// Whether this replica runs the pool-wide passes (housekeeping, warm
    /// pools) now: it holds the database's leader advisory lock, taken on a
    /// connection of its own. When the leading replica dies its connection
    /// closes, PostgreSQL releases the lock, and the next replica to ask
    /// takes it.
    public func leads() async -> Bool {
        await leadership.leads()
    }
}

/// The connection that holds (or keeps asking for) the leader lock.
actor Leadership {
    let location: PostgresLocation
    let logger: Logger
    private var connection: PostgresConnection?
    private var holds = false
    /// The question in progress: callers at once share its answer (the
    /// actor runs others while one awaits, and two would race for the connection).
    private var asking: Task<Bool, Never>?

    init(location: PostgresLocation, logger: Logger) {
        self.location = location
        self.logger = logger
    }

    func leads() async -> Bool {
        if let asking { return await asking.value }
        let question = Task { await self.ask() }
        asking = question
        let answer = await question.value
        asking = nil
        return answer
    }

    private func ask() async -> Bool {
        do {
            let connection = try await connected()
            if holds {
                // A session-level lock lasts as long as its connection does.
                for try await _ in try await connection.query("SELECT 1", logger: logger) {}
                return true
            }
            for try await taken in try await connection.query(
                "SELECT pg_try_advisory_lock(\(PostgresStore.leaderLock))", logger: logger
            ).decode(Bool.self) where taken {
                holds = true
                logger.info("this replica now runs the pool-wide passes (housekeeping, warm pools)")
            }
            return holds
        } catch {
            if holds { logger.warning("lost the leader lock's connection", metadata: ["error": "\(PostgresStore.describe(error))"]) }
            holds = false
            let lost = connection
            connection = nil
            try? await lost?.close()
            return false
        }
    }

    private func connected() async throws -> PostgresConnection {
        if let connection, !connection.isClosed { return connection }
        holds = false
        let connection = try await PostgresConnection.connect(
            configuration: try location.connectionConfiguration(), id: 1, logger: logger)
        self.connection = connection
        return connection
    }

    /// Gives the lock up (closing its connection).
    func resign() async {
        holds = false
        let closing = connection
        connection = nil
        try? await closing?.close()
    }
}
